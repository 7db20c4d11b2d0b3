//! Conversions between model types and the kernel's map representation.

use std::net::{IpAddr, Ipv6Addr};

use sockmesh_common::ServiceKey;

use crate::model::{Protocol, ServiceAddr};

/// An address as the maps store it: IPv6, or IPv4-mapped IPv6, in network order.
pub fn ip_to_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The inverse of [`ip_to_words`]; IPv4-mapped addresses come back as IPv4.
pub fn words_to_ip(w: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A port as the maps store it (network byte order).
pub fn port_to_map(port: u16) -> u16 {
    port.to_be()
}

/// The inverse of [`port_to_map`].
pub fn port_from_map(port: u16) -> u16 {
    u16::from_be(port)
}

/// The service map key of a service address.
pub fn service_key(s: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        addr: ip_to_words(s.vip),
        port: port_to_map(s.port),
        proto: s.protocol.number(),
        pad: 0,
    }
}

/// The service address of a service map key, if its protocol is one sockmesh uses.
pub fn service_addr(k: &ServiceKey) -> Option<ServiceAddr> {
    Some(ServiceAddr {
        vip: words_to_ip(k.addr),
        port: port_from_map(k.port),
        protocol: Protocol::from_number(k.proto)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_stored_mapped_in_network_order() {
        let w = ip_to_words("10.96.0.1".parse().expect("addr"));
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1]
        );
        assert_eq!(w[2], sockmesh_common::V4_MAPPED_WORD);
        assert_eq!(words_to_ip(w), "10.96.0.1".parse::<IpAddr>().expect("addr"));
    }

    #[test]
    fn v6_round_trips_and_port_is_big_endian() {
        let ip: IpAddr = "fd00:96::1".parse().expect("addr");
        assert_eq!(words_to_ip(ip_to_words(ip)), ip);
        assert_eq!(port_to_map(80).to_ne_bytes(), [0, 80]);
        let s = ServiceAddr {
            vip: ip,
            port: 53,
            protocol: Protocol::Udp,
        };
        assert_eq!(service_addr(&service_key(&s)), Some(s));
    }
}
