//! The embedding API: `Speaker`, the handle the agent and `starling-bgpd`
//! drive. `start` binds the listeners and spawns the instance task; every
//! method is a `Command` to that task, answered over a oneshot channel.

use crate::config::{PeerConfig, SpeakerConfig};
use crate::instance::{Command, Instance, SessionStarter};
use crate::report::{RouteEntry, RouteEvent, SessionStatus};
use crate::session::{self, LocalInfo};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// The handle's answers live in `report`; `RibSummary` is also named here,
/// where the agent imports it from.
pub use crate::report::RibSummary;

/// Handle to a running speaker. Cloning it gives another handle to the same speaker.
#[derive(Clone)]
pub struct Speaker {
    cmd: mpsc::UnboundedSender<Command>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the speaker has stopped")]
    Stopped,
    #[error("{0}")]
    Peer(String),
}

impl Speaker {
    /// Bind the listeners and start the instance task. Returns the handle and
    /// the stream of best-path changes.
    pub async fn start(
        cfg: SpeakerConfig,
    ) -> Result<(Speaker, mpsc::UnboundedReceiver<RouteEvent>), SpeakerError> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (route_tx, route_rx) = mpsc::unbounded_channel();
        let (sess_tx, sess_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();
        let listeners = listen(&cfg.listen, conn_tx)?;
        let local = Arc::new(LocalInfo::new(&cfg));
        let start_session: SessionStarter = Box::new(move |session, rx| {
            session::spawn(session, local.clone(), sess_tx.clone(), rx)
        });
        let inst = Instance::new(&cfg, listeners, start_session, route_tx);
        tokio::spawn(inst.run(cmd_rx, sess_rx, conn_rx));
        Ok((Speaker { cmd: cmd_tx }, route_rx))
    }

    fn send(&self, c: Command) -> Result<(), SpeakerError> {
        self.cmd.send(c).map_err(|_| SpeakerError::Stopped)
    }

    /// Add a peer, or replace the configuration of an existing one: a
    /// changed session setting restarts the session with Cease / Other
    /// Configuration Change, a changed policy keeps it.
    pub async fn add_peer(&self, cfg: PeerConfig) -> Result<(), SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::AddPeer(cfg, tx))?;
        rx.await
            .map_err(|_| SpeakerError::Stopped)?
            .map_err(SpeakerError::Peer)
    }

    /// Remove a peer; its session is closed with Cease / Peer De-configured.
    pub async fn remove_peer(&self, addr: IpAddr) -> Result<bool, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::RemovePeer(addr, tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    pub fn announce(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.send(Command::Announce(prefix.trunc()))
    }

    pub fn withdraw(&self, prefix: IpNet) -> Result<(), SpeakerError> {
        self.send(Command::Withdraw(prefix.trunc()))
    }

    pub async fn sessions(&self) -> Result<Vec<SessionStatus>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Sessions(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Next-hop reachability changed (the embedder's resolver answers
    /// differently now): run the decision process for every prefix again.
    pub fn next_hops_changed(&self) -> Result<(), SpeakerError> {
        self.send(Command::Redecide)
    }

    /// Change the route reflector cluster ID; every peer's Adj-RIB-Out is
    /// brought in line with the new CLUSTER_LIST at once.
    pub fn set_cluster_id(&self, id: Ipv4Addr) -> Result<(), SpeakerError> {
        self.send(Command::SetClusterId(id))
    }

    pub async fn summary(&self) -> Result<RibSummary, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Summary(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    pub async fn routes(&self) -> Result<Vec<RouteEntry>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Routes(tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }

    /// Close every session with Cease / Administrative Shutdown carrying
    /// `message` (RFC 9003), and stop.
    pub async fn shutdown(&self, message: &str) -> Result<(), SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Shutdown(message.to_string(), tx))?;
        rx.await.map_err(|_| SpeakerError::Stopped)
    }
}

/// Bind every listen address; each listener hands what it accepts to the
/// instance, which matches it to a peer.
fn listen(
    addrs: &[SocketAddr],
    conn_tx: mpsc::UnboundedSender<(TcpStream, SocketAddr)>,
) -> Result<Vec<Arc<TcpListener>>, SpeakerError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let l = bind(*addr).map_err(|source| SpeakerError::Listen {
            addr: *addr,
            source,
        })?;
        let l = Arc::new(l);
        listeners.push(l.clone());
        let tx = conn_tx.clone();
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, from)) => {
                        if tx.send((s, from)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    Ok(listeners)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

/// The speaker as an embedder runs it, against a peer played by the test
/// over loopback TCP.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerConfig;
    use crate::fsm::State;
    use crate::session::PANIC_COMMUNITY;
    use crate::wire;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DEADLINE: Duration = Duration::from_secs(20);
    const ASN: u32 = 65000;

    /// Accept the speaker's connection and bring the session up.
    async fn establish(l: &TcpListener) -> TcpStream {
        let (mut s, _) = tokio::time::timeout(DEADLINE, l.accept())
            .await
            .expect("the speaker connects")
            .unwrap();
        let open = wire::build_open(&wire::OpenParams {
            asn: ASN,
            hold_time: 90,
            router_id: "192.0.2.9".parse().unwrap(),
            families: vec![crate::Family::Ipv4],
            graceful_restart: None,
            extended_message: false,
        });
        s.write_all(&wire::encode(&open)).await.unwrap();
        s.write_all(&wire::keepalive()).await.unwrap();
        s
    }

    /// An UPDATE for 10.0.0.0/8 with one community.
    fn update(community: u32) -> Vec<u8> {
        let mut attrs = vec![0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 3, 4, 127, 0, 0, 2];
        attrs.extend_from_slice(&[0xc0, 8, 4]);
        attrs.extend_from_slice(&community.to_be_bytes());
        let mut m = vec![0xff; 16];
        let len = 19 + 4 + attrs.len() + 2;
        m.extend_from_slice(&(len as u16).to_be_bytes());
        m.extend_from_slice(&[2, 0, 0]);
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&attrs);
        m.extend_from_slice(&[8, 10]);
        m
    }

    async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut cond: F) {
        let until = tokio::time::Instant::now() + DEADLINE;
        while !cond().await {
            assert!(tokio::time::Instant::now() < until, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_panicking_session_is_reset_and_the_speaker_lives_on() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = SpeakerConfig::new(ASN, "192.0.2.1".parse().unwrap());
        cfg.listen = vec![];
        cfg.graceful_restart = None;
        cfg.connect_retry = 1;
        let (speaker, _events) = Speaker::start(cfg).await.unwrap();
        let mut peer = PeerConfig::new("127.0.0.1".parse().unwrap(), ASN);
        peer.port = l.local_addr().unwrap().port();
        speaker.add_peer(peer).await.unwrap();

        let mut s = establish(&l).await;
        s.write_all(&update(1)).await.unwrap();
        wait_until("10/8 learned", async || {
            speaker.routes().await.unwrap().len() == 1
        })
        .await;

        s.write_all(&update(PANIC_COMMUNITY)).await.unwrap();
        wait_until("the session reset and its route withdrawn", async || {
            let t = speaker.sessions().await.unwrap();
            t[0].state != State::Established.to_string()
                && t[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("panicked"))
                && speaker.routes().await.unwrap().is_empty()
        })
        .await;
        // The connection went with the task.
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the panicked session's connection stays open"),
            }
        }
        // A new session task comes up, and the speaker still answers.
        let mut s = establish(&l).await;
        s.write_all(&update(2)).await.unwrap();
        wait_until("10/8 learned again", async || {
            speaker.routes().await.unwrap().len() == 1
        })
        .await;
        assert_eq!(speaker.summary().await.unwrap().sessions_established, 1);
    }
}
