//! The `starling` CNI plugin's library half: the protocol it speaks with the
//! agent ([`proto`]), imported by both the plugin and the agent, and the
//! naming rules both sides must agree on.

pub mod proto;

/// The host-side veth name for a container: "stl" plus the first 11 hex
/// digits of an FNV-1a hash of the container id and interface, so a
/// retry or a DEL finds the same name without any stored state (15 bytes,
/// the kernel's IFNAMSIZ limit).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = fnv1a64(container_id.as_bytes(), ifname.as_bytes());
    format!("stl{:011x}", h >> 20)
}

/// A locally administered unicast MAC for the pod side, derived from the same
/// hash: a fixed pod MAC means the result needs no read-back from the kernel.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let h = fnv1a64(container_id.as_bytes(), ifname.as_bytes()).to_be_bytes();
    [0x0a, h[0], h[1], h[2], h[3], h[4]]
}

fn fnv1a64(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.iter().chain([0u8].iter()).chain(b.iter()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_fits_ifnamsiz_and_is_stable() {
        let a = host_veth_name("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("stl"));
        assert_eq!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef", "eth0")
        );
        assert_ne!(
            a,
            host_veth_name("0123456789abcdef0123456789abcdef", "eth1")
        );
    }

    #[test]
    fn pod_mac_is_locally_administered_unicast() {
        let m = pod_mac("c", "eth0");
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
    }
}
