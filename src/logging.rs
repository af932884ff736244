//! Under systemd (JOURNAL_STREAM set) logs go to journald with structured
//! fields; otherwise human-readable lines on stderr. `RUST_LOG` filters.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry
            .with(journald.with_syslog_identifier("cluster-agent".into()))
            .try_init();
        return;
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
}
