//! The host's network interfaces, for the floating endpoint: which
//! interface carries the node's address, adding and removing an address
//! through rtnetlink (as `ip address` does, without running it), and
//! gratuitous ARP so that the segment's neighbour caches move to the new
//! holder at once instead of after their entries go stale.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

#[derive(Debug, thiserror::Error)]
pub enum HostNetError {
    #[error("no interface of this host has the node's address {0}; is the network up?")]
    NoInterface(Ipv4Addr),
    #[error("listing this host's interfaces: {0}")]
    List(#[source] nix::Error),
    #[error("{what} on {interface}: {source}")]
    Netlink {
        what: String,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "gratuitous ARP for {address} on {interface}: {source} (the unit needs CAP_NET_RAW and AF_PACKET)"
    )]
    Arp {
        address: Ipv4Addr,
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// An interface as the floating endpoint needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// `None` on interfaces without a link-layer address (loopback has
    /// all zeroes, which ARP cannot announce either).
    pub mac: Option<[u8; 6]>,
}

fn carries(entry: &nix::ifaddrs::InterfaceAddress, address: Ipv4Addr) -> bool {
    entry
        .address
        .as_ref()
        .and_then(|a| a.as_sockaddr_in())
        .is_some_and(|a| a.ip() == address)
}

/// The interface that has `address`, in this network namespace.
pub fn interface_with(address: Ipv4Addr) -> Result<Interface, HostNetError> {
    let entries: Vec<_> = nix::ifaddrs::getifaddrs()
        .map_err(HostNetError::List)?
        .collect();
    let name = entries
        .iter()
        .find(|e| carries(e, address))
        .map(|e| e.interface_name.clone())
        .ok_or(HostNetError::NoInterface(address))?;
    let link = entries
        .iter()
        .filter(|e| e.interface_name == name)
        .find_map(|e| e.address.as_ref().and_then(|a| a.as_link_addr()).copied());
    let index = match link {
        Some(l) => u32::try_from(l.ifindex()).unwrap_or_default(),
        None => nix::net::if_::if_nametoindex(name.as_str()).map_err(HostNetError::List)?,
    };
    Ok(Interface {
        mac: link
            .and_then(|l| l.addr())
            .filter(|m| m.iter().any(|b| *b != 0)),
        name,
        index,
    })
}

/// Whether `address` is on any interface of this namespace.
pub fn has_address(address: Ipv4Addr) -> Result<bool, HostNetError> {
    Ok(nix::ifaddrs::getifaddrs()
        .map_err(HostNetError::List)?
        .any(|e| carries(&e, address)))
}

/// The IPv4 networks `interface` is on (address and prefix, as `ip -4
/// address show` lists them), in this network namespace.
pub fn ipv4_networks(interface: &str) -> Result<Vec<ipnet::Ipv4Net>, HostNetError> {
    Ok(nix::ifaddrs::getifaddrs()
        .map_err(HostNetError::List)?
        .filter(|e| e.interface_name == interface)
        .filter_map(|e| {
            let address = e.address.as_ref()?.as_sockaddr_in()?.ip();
            let mask = e.netmask.as_ref()?.as_sockaddr_in()?.ip();
            ipnet::Ipv4Net::with_netmask(address, mask).ok()
        })
        .collect())
}

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `ip address` labels its /32 routes "host" scope only for loopback; a
/// floating address is reachable from the segment (`RT_SCOPE_UNIVERSE`).
const RT_SCOPE_UNIVERSE: u8 = 0;

/// `ip address replace ADDRESS/32 dev INTERFACE`: a host address, so no
/// second route to the node's subnet appears beside the node's own.
pub fn add_address(interface: &Interface, address: Ipv4Addr) -> Result<(), HostNetError> {
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    address_request(interface, address, RTM_NEWADDR, flags).map_err(|source| {
        HostNetError::Netlink {
            what: format!("adding {address}/32"),
            interface: interface.name.clone(),
            source,
        }
    })
}

/// `ip address del ADDRESS/32 dev INTERFACE`; `false` when it was not there.
pub fn remove_address(interface: &Interface, address: Ipv4Addr) -> Result<bool, HostNetError> {
    match address_request(interface, address, RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL) => Ok(false),
        Err(source) => Err(HostNetError::Netlink {
            what: format!("removing {address}/32"),
            interface: interface.name.clone(),
            source,
        }),
    }
}

/// One rtnetlink address request and its acknowledgement (an `nlmsgerr`
/// whose error is 0, or the negated errno).
fn address_request(
    interface: &Interface,
    address: Ipv4Addr,
    kind: u16,
    flags: u16,
) -> io::Result<()> {
    let attribute = |kind: u16| {
        let mut a = Vec::with_capacity(8);
        a.extend_from_slice(&8u16.to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(&address.octets());
        a
    };
    let mut body = vec![nix::libc::AF_INET as u8, 32, 0, RT_SCOPE_UNIVERSE];
    body.extend_from_slice(&interface.index.to_ne_bytes());
    body.extend(attribute(IFA_LOCAL));
    body.extend(attribute(IFA_ADDRESS));
    let sequence: u32 = rand::random();
    let mut message = Vec::with_capacity(16 + body.len());
    message.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend(body);

    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    sendto(
        fd.as_raw_fd(),
        &message,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut reply = [0u8; 8192];
    loop {
        let n = recv(fd.as_raw_fd(), &mut reply, MsgFlags::empty())?;
        let mut at = 0;
        while at + 20 <= n {
            let field =
                |o: usize| u32::from_ne_bytes(reply[at + o..at + o + 4].try_into().unwrap());
            let length = field(0) as usize;
            let kind = u16::from_ne_bytes([reply[at + 4], reply[at + 5]]);
            if field(8) == sequence && kind == NLMSG_ERROR {
                let errno = i32::from_ne_bytes(reply[at + 16..at + 20].try_into().unwrap());
                return match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
            }
            if length < 16 {
                break;
            }
            at += (length + 3) & !3;
        }
    }
}

/// `ETH_P_ARP`, `ARPHRD_ETHER`, `ARPOP_REQUEST`.
const ETH_P_ARP: u16 = 0x0806;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;

/// The gratuitous ARP request announcing that `address` is at
/// `interface`'s MAC: sender and target protocol address both `address`,
/// as RFC 5227 §3 describes an ARP announcement.
pub fn arp_announcement(mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut packet = [0u8; 28];
    packet[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    packet[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
    packet[4] = 6;
    packet[5] = 4;
    packet[6..8].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    packet[8..14].copy_from_slice(&mac);
    packet[14..18].copy_from_slice(&address.octets());
    packet[24..28].copy_from_slice(&address.octets());
    packet
}

/// Broadcasts one [`arp_announcement`] on `interface`. An interface
/// without a MAC has no neighbours to tell.
pub fn announce(interface: &Interface, address: Ipv4Addr) -> Result<(), HostNetError> {
    let Some(mac) = interface.mac else {
        return Ok(());
    };
    let failed = |source: io::Error| HostNetError::Arp {
        address,
        interface: interface.name.clone(),
        source,
    };
    let fd = socket(
        AddressFamily::Packet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| failed(e.into()))?;
    let packet = arp_announcement(mac, address);
    // SAFETY: a zeroed sockaddr_ll is valid; every field set below is
    // plain data, and sendto reads `size_of::<sockaddr_ll>()` bytes of it
    // and `packet.len()` bytes of `packet`, both alive for the call.
    let sent = unsafe {
        let mut to: nix::libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = nix::libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = i32::try_from(interface.index).unwrap_or_default();
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        nix::libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            std::mem::size_of::<nix::libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_names_the_address_as_sender_and_target() {
        let packet = arp_announcement([2, 0, 0, 0, 0, 7], Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(
            packet,
            [
                0, 1, 8, 0, 6, 4, 0, 1, // Ethernet/IPv4, request
                2, 0, 0, 0, 0, 7, 10, 0, 0, 100, // sender
                0, 0, 0, 0, 0, 0, 10, 0, 0, 100, // target
            ]
        );
    }
}
