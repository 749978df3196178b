//! BGP UPDATE encode and decode throughput: packs N unique IPv4 /24s (and
//! IPv6 /48s) into UPDATEs with shared attributes, then decodes them back
//! through the same path a session uses (framing, netgauze parse, RFC 7606
//! checks, conversion to our model). Prints JSON lines; asserts nothing.
//!
//!     cargo run --release -p starling-tests --bin bgp-codec-bench -- [N]

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use starling_bgp::Family;
use starling_bgp::attrs::{AsSegment, Origin, PathAttrs, SegmentKind};
use starling_bgp::wire;
use starling_tests::bench_line;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let attrs = PathAttrs {
        origin: Origin::Igp,
        as_path: vec![AsSegment {
            kind: SegmentKind::Sequence,
            asns: vec![65001, 4_200_000_001],
        }],
        next_hop: Some("192.0.2.1".parse().unwrap()),
        communities: vec![0xfde8_0001],
        ..Default::default()
    };
    for (family, prefixes) in [
        (
            Family::Ipv4,
            (0..n)
                .map(|i| {
                    IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i << 8)), 24)
                            .unwrap(),
                    )
                })
                .collect::<Vec<_>>(),
        ),
        (
            Family::Ipv6,
            (0..n)
                .map(|i| {
                    IpNet::V6(
                        Ipv6Net::new(
                            Ipv6Addr::from(
                                0x2001_0db8_0000_0000_0000_0000_0000_0000u128 | ((i as u128) << 80),
                            ),
                            48,
                        )
                        .unwrap(),
                    )
                })
                .collect::<Vec<_>>(),
        ),
    ] {
        let mut a = attrs.clone();
        if family == Family::Ipv6 {
            a.next_hop = Some("2001:db8::1".parse().unwrap());
        }
        let t = Instant::now();
        let msgs = wire::encode_announce(family, &prefixes, &a, true, true, wire::MAX_MESSAGE_LEN);
        let enc = t.elapsed().as_secs_f64();
        let bytes: usize = msgs.iter().map(|m| m.len()).sum();

        let t = Instant::now();
        let mut ctx = wire::parsing_context(true);
        let mut count = 0usize;
        for m in &msgs {
            let (msg, ignored) = wire::decode(m, &mut ctx).expect("our own message decodes");
            if let BgpMessage::Update(u) = msg {
                count += wire::decode_update(&u, &ignored, true, false)
                    .expect("valid")
                    .announced
                    .len();
            }
        }
        let dec = t.elapsed().as_secs_f64();
        assert_eq!(count, prefixes.len());

        // netgauze's parser alone, for the cost of our checks and conversion.
        let t = Instant::now();
        let mut ctx = wire::parsing_context(true);
        for m in &msgs {
            let mut r = SliceReader::new(m);
            let _ = BgpMessage::parse(&mut r, &mut ctx).expect("parses");
        }
        let raw = t.elapsed().as_secs_f64();

        let f = if family == Family::Ipv4 {
            "ipv4"
        } else {
            "ipv6"
        };
        bench_line(
            "bgp-codec",
            "starling",
            &format!("encode_{f}_prefixes_per_s"),
            n as f64 / enc,
            "prefixes/s",
        );
        bench_line(
            "bgp-codec",
            "starling",
            &format!("decode_{f}_prefixes_per_s"),
            n as f64 / dec,
            "prefixes/s",
        );
        bench_line(
            "bgp-codec",
            "netgauze-parse-only",
            &format!("decode_{f}_prefixes_per_s"),
            n as f64 / raw,
            "prefixes/s",
        );
        bench_line(
            "bgp-codec",
            "starling",
            &format!("{f}_updates"),
            msgs.len() as f64,
            "messages",
        );
        bench_line(
            "bgp-codec",
            "starling",
            &format!("{f}_bytes_per_prefix"),
            bytes as f64 / n as f64,
            "bytes",
        );
    }
}
