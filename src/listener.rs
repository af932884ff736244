//! The accept loop every server of the agent runs (the join service, the
//! bootstrap machine's `serve`): a cap on open connections so a flood of
//! clients cannot exhaust file descriptors, and a back-off on accept errors
//! so an exhausted process does not spin.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Accepts connections until `shutdown` resolves, running `connection` for
/// each on its own task; connections beyond `max_connections` open at once
/// are closed at once.
pub async fn accept_until<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    connection: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of
                    // spinning on a listener that cannot accept.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; closing this one");
            continue;
        };
        let task = connection(stream, peer);
        tokio::spawn(async move {
            task.await;
            drop(slot);
        });
    }
}
