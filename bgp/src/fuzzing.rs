//! Entry points for the fuzz targets in `fuzz/` (docs/bgp.md, "Fuzzing").
//! `decode` runs the wire code alone; `session` runs a whole speaker
//! (sessions, instance, RIBs, export) against bytes sent by a peer.

use crate::config::{MaxPrefixAction, MaxPrefixes, PeerConfig, SpeakerConfig};
use crate::speaker::Speaker;
use crate::{Family, wire};
use netgauze_bgp_pkt::BgpMessage;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
                    let _ =
                        wire::check_open(&o, 65001, "192.0.2.1".parse().expect("literal"), false);
                }
                Ok(_) => {}
                Err(_) => break,
            }
            buf = &buf[len..];
        }
    }
}

/// Our AS in the `session` target; the seed capture (`capture_fuzz_corpus`
/// in tests/tests/bgp_interop.rs) peers with the same numbers, so the
/// captured AS_PATHs fit.
pub const LOCAL_AS: u32 = 65010;
/// The fuzzed peer's AS when it is external.
pub const EXTERNAL_AS: u32 = 65002;

/// How the fuzzed peer is configured: the low bits of the input's first
/// octet. The seed corpus (fuzz/seeds/session/) starts each file with it.
#[derive(Clone, Copy, Debug)]
pub struct SessionSetup {
    pub role: Role,
    /// Both sides advertise graceful restart (RFC 4724): when the fuzzed
    /// peer's connection closes at the end (no NOTIFICATION), its routes
    /// are kept as stale while the tables are read back.
    pub graceful_restart: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// eBGP, import and export open (no RFC 8212 policy).
    External,
    /// Plain iBGP.
    Internal,
    /// iBGP route-reflector client (RFC 4456): its routes are reflected to
    /// the other iBGP peer.
    ReflectorClient,
    /// eBGP with a maximum prefix count of 2 that closes the session.
    ExternalLimited,
}

impl SessionSetup {
    pub fn from_octet(b: u8) -> SessionSetup {
        let role = match b & 3 {
            0 => Role::External,
            1 => Role::Internal,
            2 => Role::ReflectorClient,
            _ => Role::ExternalLimited,
        };
        SessionSetup {
            role,
            graceful_restart: b & 4 != 0,
        }
    }

    pub fn octet(self) -> u8 {
        let role = match self.role {
            Role::External => 0,
            Role::Internal => 1,
            Role::ReflectorClient => 2,
            Role::ExternalLimited => 3,
        };
        role | if self.graceful_restart { 4 } else { 0 }
    }

    fn peer_as(self) -> u32 {
        match self.role {
            Role::External | Role::ExternalLimited => EXTERNAL_AS,
            Role::Internal | Role::ReflectorClient => LOCAL_AS,
        }
    }
}

/// A whole speaker over loopback TCP with two peers: the fuzzed one
/// (127.0.0.1, configured by the first octet, see [`SessionSetup`]) and a
/// quiet iBGP peer (127.0.0.2) that takes whatever is exported or
/// reflected to it. Both sessions are brought to Established with a valid
/// OPEN and KEEPALIVE; then the rest of the input is written to the
/// fuzzed peer's session, its side is closed, and the speaker's tables are
/// read back before it shuts down.
pub fn session(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let setup = SessionSetup::from_octet(first);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run_session(setup, rest));
}

async fn run_session(setup: SessionSetup, data: &[u8]) {
    let fuzzed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let quiet = TcpListener::bind("127.0.0.2:0").await.expect("bind");
    let mut cfg = SpeakerConfig::new(LOCAL_AS, Ipv4Addr::new(192, 0, 2, 1));
    cfg.listen = vec![];
    cfg.connect_retry = 1;
    cfg.ebgp_requires_policy = false;
    cfg.graceful_restart = setup.graceful_restart.then_some(120);
    cfg.batch_interval = Duration::from_millis(1);
    let (speaker, mut events) = Speaker::start(cfg).await.expect("speaker");
    let mut peer = PeerConfig::new(IpAddr::from([127, 0, 0, 1]), setup.peer_as());
    peer.port = fuzzed.local_addr().expect("addr").port();
    peer.families = vec![Family::Ipv4, Family::Ipv6];
    peer.route_reflector_client = setup.role == Role::ReflectorClient;
    if setup.role == Role::ExternalLimited {
        peer.max_prefixes = Some(MaxPrefixes {
            limit: 2,
            action: MaxPrefixAction::Close,
        });
    }
    speaker.add_peer(peer).await.expect("fuzzed peer");
    let mut other = PeerConfig::new(IpAddr::from([127, 0, 0, 2]), LOCAL_AS);
    other.port = quiet.local_addr().expect("addr").port();
    other.families = vec![Family::Ipv4, Family::Ipv6];
    speaker.add_peer(other).await.expect("quiet peer");
    // Our own prefixes, so every session has something to export.
    for p in ["10.0.0.0/24", "2001:db8::/48"] {
        let _ = speaker.announce(p.parse().expect("literal"));
    }

    let mut quiet = establish(&quiet, LOCAL_AS, false).await;
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 65536];
        while let Ok(n) = quiet.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let mut client = establish(&fuzzed, setup.peer_as(), setup.graceful_restart).await;
    let _ = client.write_all(data).await;
    // Our side closes without a NOTIFICATION, as a restarting peer's
    // would: with graceful restart the speaker keeps its routes as stale.
    let _ = client.shutdown().await;
    let mut sink = vec![0u8; 65536];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    drop(client);
    let _ = speaker.sessions().await;
    let _ = speaker.routes().await;
    let _ = speaker.summary().await;
    let _ = speaker.shutdown("fuzz").await;
    drain.abort();
    while events.try_recv().is_ok() {}
}

/// Accept the speaker's connection and send a valid OPEN and KEEPALIVE
/// (IPv4 and IPv6 unicast, 4-octet AS, extended messages).
async fn establish(l: &TcpListener, asn: u32, graceful_restart: bool) -> TcpStream {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the speaker connects within 10 s")
        .expect("accept");
    let open = wire::build_open(&wire::OpenParams {
        asn,
        hold_time: 90,
        router_id: Ipv4Addr::new(192, 0, 2, 2),
        families: vec![Family::Ipv4, Family::Ipv6],
        graceful_restart: graceful_restart.then_some(wire::GracefulRestart {
            restart_time: 120,
            restarting: false,
            forwarding: true,
        }),
        extended_message: true,
    });
    let _ = s.write_all(&wire::encode(&open)).await;
    let _ = s.write_all(&wire::keepalive()).await;
    s
}
