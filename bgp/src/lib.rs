//! Starling's BGP speaker. It knows nothing of Kubernetes or netlink: an
//! embedder (the agent, or `starling-bgpd`) configures peers and local
//! prefixes and consumes the stream of route changes.
//!
//! The modules form one-way layers (docs/architecture.md draws them); each
//! imports only from the layers before it:
//!
//! - `attrs`: our model of a path's attributes. `wire`: the messages on the
//!   wire, one file per message, converted to and from `attrs`.
//!   `policy`: import/export rules over `attrs`. `fsm`: RFC 4271 §8 as a
//!   pure function. `sockopt`: the socket options std lacks. `jsonl`:
//!   JSON-lines control sockets, with nothing of BGP in them.
//! - `config` and `report`: the public types, what the embedder tells the
//!   speaker and what it hears back.
//! - `rib`: Adj-RIBs-In, the Loc-RIB and the decision process.
//! - `session`: one task per peer, driving the FSM over TCP.
//! - `export`: the export rules as pure functions.
//! - `instance`: the task that owns the peer table and the RIBs.
//! - `speaker`: the handle. `control`: `starling-bgpd`'s control socket.

pub mod attrs;
pub mod config;
pub mod control;
mod export;
pub mod fsm;
mod instance;
pub mod jsonl;
pub mod policy;
pub mod report;
pub mod rib;
pub mod session;
pub mod sockopt;
pub mod speaker;
pub mod wire;

pub use attrs::{Family, PathAttrs};
pub use config::{
    MaxPrefixAction, MaxPrefixes, NextHopResolver, PeerConfig, PeerPolicy, SessionConfig,
    SpeakerConfig,
};
pub use report::{LearnedPath, RibSummary, RouteChange, RouteEntry, RouteEvent, SessionStatus};
pub use speaker::{Speaker, SpeakerError};

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use crate::wire;
    use netgauze_bgp_pkt::BgpMessage;

    /// Frame and decode arbitrary bytes the way a session does, in both
    /// 2- and 4-octet AS modes and for internal and external peers, and run
    /// the UPDATE (RFC 7606 screen included) and OPEN checks.
    pub fn decode(data: &[u8]) {
        for (asn4, ebgp) in [(true, true), (false, true), (true, false)] {
            let mut buf = data;
            let mut ctx = wire::parsing_context(asn4);
            let screen = wire::Screen {
                four_octet: asn4,
                ebgp,
                local_addr: Some("192.0.2.1".parse().expect("literal")),
            };
            while let Ok(Some(len)) = wire::frame(buf, wire::MAX_EXTENDED_MESSAGE_LEN) {
                if buf[18] == wire::MessageType::Update as u8 {
                    if wire::receive_update(&buf[..len], &mut ctx, &screen).is_err() {
                        break;
                    }
                    buf = &buf[len..];
                    continue;
                }
                match wire::decode(&buf[..len], &mut ctx) {
                    Ok((BgpMessage::Open(o), _)) => {
                        let _ = wire::check_open(
                            &o,
                            65001,
                            "192.0.2.1".parse().expect("literal"),
                            false,
                        );
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
                buf = &buf[len..];
            }
        }
    }

    /// Feed arbitrary bytes to a real session over loopback TCP, after a
    /// valid OPEN and KEEPALIVE, so the bytes land in Established.
    pub fn session(data: &[u8]) {
        use crate::config::SessionConfig;
        use crate::session::{Driver, LocalInfo, ToSession};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let local = Arc::new(LocalInfo {
                asn: 65000,
                router_id: "192.0.2.1".parse().expect("literal"),
                hold_time: 90,
                min_hold_time: 3,
                connect_retry: 60,
                graceful_restart: None,
                extended_message: true,
            });
            let mut cfg = SessionConfig::new("127.0.0.1".parse().expect("literal"), 65001);
            cfg.passive = true;
            let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
            let (cmd, rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(Driver::new(cfg, local, tx).run(rx));
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            let _ = cmd.send(ToSession::Incoming(server));
            let open = wire::build_open(&wire::OpenParams {
                asn: 65001,
                hold_time: 90,
                router_id: "192.0.2.2".parse().expect("literal"),
                families: vec![crate::Family::Ipv4, crate::Family::Ipv6],
                graceful_restart: None,
                extended_message: true,
            });
            let _ = client.write_all(&wire::encode(&open)).await;
            let _ = client.write_all(&wire::keepalive()).await;
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut sink = vec![0u8; 65536];
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), async {
                while let Ok(n) = client.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            let _ = cmd.send(ToSession::Stop(wire::Notify::admin_shutdown("fuzz")));
            let _ = task.await;
            while events.try_recv().is_ok() {}
        });
    }
}
