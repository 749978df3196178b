//! The BGP finite state machine of RFC 4271 §8, as a pure function:
//! `step(session, event) -> (session, actions)`, one function per state as
//! §8.2.2 describes them. It performs no I/O and reads no clock; the session
//! driver turns actions into socket writes and timers, and socket reads and
//! timer expiries into events. Event names are the RFC's (§8.1).
//!
//! Only the events the driver raises exist here. The optional session
//! attributes of §8.1.1 are not implemented (no DelayOpen, no
//! DampPeerOscillations, no SendNOTIFICATIONwithoutOPEN), so neither are
//! their events (6-8, 12-15, 20, 24) nor the ConnectRetryCounter, which
//! only peer oscillation damping reads. A passive peer is a session
//! attribute (`Session::passive`) rather than event 4; after an error the
//! driver waits one ConnectRetryTime before its automatic restart.

use crate::wire::{Cease, ErrorCode, FsmError, Notify};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// RFC 4271 §8.1 events (the numbers are the RFC's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Event 1.
    ManualStart,
    /// Event 2, with the Cease NOTIFICATION to send (RFC 9003 message included).
    ManualStop(Notify),
    /// Event 3.
    AutomaticStart,
    /// Event 5.
    AutomaticStartWithPassiveTcpEstablishment,
    /// Event 9.
    ConnectRetryTimerExpires,
    /// Event 10.
    HoldTimerExpires,
    /// Event 11.
    KeepaliveTimerExpires,
    /// Event 16: our outgoing connection completed.
    TcpCrAcked,
    /// Event 17: an incoming connection was accepted.
    TcpConnectionConfirmed,
    /// Event 18.
    TcpConnectionFails,
    /// Event 19: a valid OPEN, with the negotiated hold time.
    BgpOpen { hold_time: u16 },
    /// Event 21.
    BgpHeaderErr(Notify),
    /// Event 22.
    BgpOpenMsgErr(Notify),
    /// Event 23: this connection lost collision resolution (§6.8).
    OpenCollisionDump,
    /// Event 25.
    NotifMsg,
    /// Event 26.
    KeepAliveMsg,
    /// Event 27.
    UpdateMsg,
    /// Event 28.
    UpdateMsgErr(Notify),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    InitiateTcp,
    DropTcp,
    SendOpen,
    SendKeepalive,
    SendNotification(Notify),
    StartConnectRetryTimer,
    StopConnectRetryTimer,
    /// Start (or restart) the hold timer with this many seconds; 0 stops it.
    StartHoldTimer(u16),
    /// Start (or restart) the keepalive timer with this many seconds; 0 stops it.
    StartKeepaliveTimer(u16),
    /// The session reached Established.
    SessionUp,
    /// The session left Established: release its routes.
    SessionDown,
    /// Back in Idle after an error: start again automatically later
    /// (the driver's idle hold, RFC 4271 §8.1.1 DampPeerOscillations spirit).
    ScheduleRestart,
}

/// The FSM's own variables (§8): the state, whether this peer is passive
/// (the PassiveTcpEstablishment attribute, §8.1.1) and the hold time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub state: State,
    pub passive: bool,
    /// Hold time negotiated with the peer (0: no keepalives, no hold timer).
    pub hold_time: u16,
}

/// Hold timer used between connecting and receiving the OPEN (§8.2.2: "a large value", 4 minutes).
pub const LARGE_HOLD_TIME: u16 = 240;

impl Session {
    pub fn new(passive: bool) -> Session {
        Session {
            state: State::Idle,
            passive,
            hold_time: 0,
        }
    }
}

/// One FSM transition.
pub fn step(mut s: Session, ev: Event) -> (Session, Vec<Action>) {
    use Event as E;
    use State::*;
    let mut acts = Vec::new();
    match (s.state, ev) {
        (Idle, ev) => idle(&mut s, ev, &mut acts),
        // ManualStop in any other state (§8.2.2, all states).
        (_, E::ManualStop(n)) => manual_stop(&mut s, n, &mut acts),
        // Start events outside Idle are ignored.
        (_, E::ManualStart | E::AutomaticStart | E::AutomaticStartWithPassiveTcpEstablishment) => {}
        (Connect | Active, ev) => connect_or_active(&mut s, ev, &mut acts),
        (OpenSent, ev) => open_sent(&mut s, ev, &mut acts),
        (OpenConfirm, ev) => open_confirm(&mut s, ev, &mut acts),
        (Established, ev) => established(&mut s, ev, &mut acts),
    }
    (s, acts)
}

/// Idle (§8.2.2): only the start events do anything.
fn idle(s: &mut Session, ev: Event, acts: &mut Vec<Action>) {
    match ev {
        Event::ManualStart | Event::AutomaticStart if !s.passive => {
            acts.push(Action::StartConnectRetryTimer);
            acts.push(Action::InitiateTcp);
            s.state = State::Connect;
        }
        Event::ManualStart
        | Event::AutomaticStart
        | Event::AutomaticStartWithPassiveTcpEstablishment => {
            acts.push(Action::StartConnectRetryTimer);
            s.state = State::Active;
        }
        _ => {}
    }
}

/// ManualStop outside Idle: a Cease to the peer when a session was being
/// opened or was up, and no automatic restart.
fn manual_stop(s: &mut Session, n: Notify, acts: &mut Vec<Action>) {
    if matches!(
        s.state,
        State::OpenSent | State::OpenConfirm | State::Established
    ) {
        acts.push(Action::SendNotification(n));
    }
    if s.state == State::Established {
        acts.push(Action::SessionDown);
    }
    acts.extend([
        Action::StopConnectRetryTimer,
        Action::StartHoldTimer(0),
        Action::StartKeepaliveTimer(0),
        Action::DropTcp,
    ]);
    s.state = State::Idle;
}

/// Connect and Active (§8.2.2): waiting for a TCP connection, ours
/// (Connect) or the peer's (Active).
fn connect_or_active(s: &mut Session, ev: Event, acts: &mut Vec<Action>) {
    match ev {
        Event::ConnectRetryTimerExpires => {
            acts.push(Action::DropTcp);
            acts.push(Action::StartConnectRetryTimer);
            if s.passive {
                s.state = State::Active;
            } else {
                acts.push(Action::InitiateTcp);
                s.state = State::Connect;
            }
        }
        Event::TcpCrAcked | Event::TcpConnectionConfirmed => {
            acts.extend([
                Action::StopConnectRetryTimer,
                Action::SendOpen,
                Action::StartHoldTimer(LARGE_HOLD_TIME),
            ]);
            s.state = State::OpenSent;
        }
        Event::TcpConnectionFails => {
            // Connect, event 18: restart the timer, keep listening (Active).
            acts.extend([Action::DropTcp, Action::StartConnectRetryTimer]);
            s.state = State::Active;
        }
        _ => fail(s, acts, None),
    }
}

/// OpenSent (§8.2.2): our OPEN is out, the peer's is awaited.
fn open_sent(s: &mut Session, ev: Event, acts: &mut Vec<Action>) {
    match ev {
        Event::TcpConnectionFails => {
            acts.extend([
                Action::DropTcp,
                Action::StartHoldTimer(0),
                Action::StartConnectRetryTimer,
            ]);
            s.state = State::Active;
        }
        Event::BgpOpen { hold_time } => {
            s.hold_time = hold_time;
            acts.push(Action::SendKeepalive);
            if hold_time > 0 {
                acts.push(Action::StartKeepaliveTimer((hold_time / 3).max(1)));
            }
            acts.push(Action::StartHoldTimer(hold_time));
            s.state = State::OpenConfirm;
        }
        Event::HoldTimerExpires => fail(
            s,
            acts,
            Some(hold_timer_expired("hold timer expired in OpenSent")),
        ),
        Event::BgpHeaderErr(n) | Event::BgpOpenMsgErr(n) | Event::UpdateMsgErr(n) => {
            fail(s, acts, Some(n))
        }
        Event::OpenCollisionDump => fail(s, acts, Some(collision_dump())),
        Event::NotifMsg => fail(s, acts, None),
        _ => fail(s, acts, Some(fsm_error(State::OpenSent))),
    }
}

/// OpenConfirm (§8.2.2): OPENs exchanged, the peer's KEEPALIVE awaited.
fn open_confirm(s: &mut Session, ev: Event, acts: &mut Vec<Action>) {
    match ev {
        Event::KeepAliveMsg => {
            acts.push(Action::StartHoldTimer(s.hold_time));
            acts.push(Action::SessionUp);
            s.state = State::Established;
        }
        Event::KeepaliveTimerExpires => send_keepalive(s, acts),
        Event::HoldTimerExpires => fail(s, acts, Some(hold_timer_expired("hold timer expired"))),
        Event::TcpConnectionFails | Event::NotifMsg => fail(s, acts, None),
        Event::BgpHeaderErr(n) | Event::BgpOpenMsgErr(n) | Event::UpdateMsgErr(n) => {
            fail(s, acts, Some(n))
        }
        Event::OpenCollisionDump => fail(s, acts, Some(collision_dump())),
        _ => fail(s, acts, Some(fsm_error(State::OpenConfirm))),
    }
}

/// Established (§8.2.2): KEEPALIVEs and UPDATEs restart the hold timer.
fn established(s: &mut Session, ev: Event, acts: &mut Vec<Action>) {
    match ev {
        Event::KeepAliveMsg | Event::UpdateMsg => acts.push(Action::StartHoldTimer(s.hold_time)),
        Event::KeepaliveTimerExpires => send_keepalive(s, acts),
        Event::HoldTimerExpires => fail(s, acts, Some(hold_timer_expired("hold timer expired"))),
        Event::TcpConnectionFails | Event::NotifMsg => fail(s, acts, None),
        Event::BgpHeaderErr(n) | Event::BgpOpenMsgErr(n) | Event::UpdateMsgErr(n) => {
            fail(s, acts, Some(n))
        }
        // OpenCollisionDump included: an Established session wins (§6.8).
        _ => fail(s, acts, Some(fsm_error(State::Established))),
    }
}

/// Any error path: tell the peer why (when there is a NOTIFICATION to
/// send), drop the connection, go Idle and restart later.
fn fail(s: &mut Session, acts: &mut Vec<Action>, notify: Option<Notify>) {
    if let Some(n) = notify {
        acts.push(Action::SendNotification(n));
    }
    if s.state == State::Established {
        acts.push(Action::SessionDown);
    }
    acts.extend([
        Action::StopConnectRetryTimer,
        Action::StartHoldTimer(0),
        Action::StartKeepaliveTimer(0),
        Action::DropTcp,
        Action::ScheduleRestart,
    ]);
    s.state = State::Idle;
}

fn send_keepalive(s: &Session, acts: &mut Vec<Action>) {
    acts.push(Action::SendKeepalive);
    acts.push(Action::StartKeepaliveTimer((s.hold_time / 3).max(1)));
}

/// §6.5: Hold Timer Expired.
fn hold_timer_expired(reason: &str) -> Notify {
    Notify::new(ErrorCode::HoldTimerExpired, vec![], reason)
}

/// §6.8: this connection lost the collision.
fn collision_dump() -> Notify {
    Notify::new(
        Cease::ConnectionCollisionResolution,
        vec![],
        "connection collision resolution (RFC 4271 §6.8)",
    )
}

/// §6.6: an event the state does not expect (subcodes RFC 6608).
fn fsm_error(state: State) -> Notify {
    let sub = match state {
        State::OpenSent => FsmError::UnexpectedMessageInOpenSent,
        State::OpenConfirm => FsmError::UnexpectedMessageInOpenConfirm,
        State::Established => FsmError::UnexpectedMessageInEstablished,
        _ => FsmError::Unspecified,
    };
    Notify::new(sub, vec![], format!("unexpected event in state {state}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{MessageHeaderError, OpenMessageError, UpdateMessageError};
    use Action as A;
    use Event as E;

    fn run(mut s: Session, evs: Vec<Event>) -> (Session, Vec<Action>) {
        let mut last = vec![];
        for e in evs {
            let (n, a) = step(s, e);
            s = n;
            last = a;
        }
        (s, last)
    }

    #[test]
    fn active_peer_reaches_established() {
        let s = Session::new(false);
        let (s, a) = step(s, E::ManualStart);
        assert_eq!(s.state, State::Connect);
        assert!(a.contains(&A::InitiateTcp));
        let (s, a) = step(s, E::TcpCrAcked);
        assert_eq!(s.state, State::OpenSent);
        assert!(a.contains(&A::SendOpen));
        let (s, a) = step(s, E::BgpOpen { hold_time: 9 });
        assert_eq!(s.state, State::OpenConfirm);
        assert_eq!(
            a,
            vec![
                A::SendKeepalive,
                A::StartKeepaliveTimer(3),
                A::StartHoldTimer(9)
            ]
        );
        let (s, a) = step(s, E::KeepAliveMsg);
        assert_eq!(s.state, State::Established);
        assert!(a.contains(&A::SessionUp));
    }

    #[test]
    fn passive_peer_never_connects() {
        let (s, a) = step(Session::new(true), E::ManualStart);
        assert_eq!(s.state, State::Active);
        assert!(!a.contains(&A::InitiateTcp));
        let (s, a) = step(s, E::ConnectRetryTimerExpires);
        assert_eq!(s.state, State::Active);
        assert!(!a.contains(&A::InitiateTcp));
        let (s, _) = step(s, E::TcpConnectionConfirmed);
        assert_eq!(s.state, State::OpenSent);
    }

    #[test]
    fn hold_time_zero_runs_no_timers() {
        let (s, a) = run(
            Session::new(false),
            vec![E::ManualStart, E::TcpCrAcked, E::BgpOpen { hold_time: 0 }],
        );
        assert_eq!(s.state, State::OpenConfirm);
        assert_eq!(a, vec![A::SendKeepalive, A::StartHoldTimer(0)]);
        let (_, a) = step(s, E::KeepAliveMsg);
        assert!(a.contains(&A::StartHoldTimer(0)));
    }

    #[test]
    fn hold_timer_expiry_in_established_notifies_and_releases_routes() {
        let (s, _) = run(
            Session::new(false),
            vec![
                E::ManualStart,
                E::TcpCrAcked,
                E::BgpOpen { hold_time: 9 },
                E::KeepAliveMsg,
            ],
        );
        let (s, a) = step(s, E::HoldTimerExpires);
        assert_eq!(s.state, State::Idle);
        assert!(matches!(&a[0], A::SendNotification(n) if n.error == ErrorCode::HoldTimerExpired));
        assert!(a.contains(&A::SessionDown));
        assert!(a.contains(&A::ScheduleRestart));
    }

    #[test]
    fn update_in_open_sent_is_an_fsm_error() {
        let (s, _) = run(Session::new(false), vec![E::ManualStart, E::TcpCrAcked]);
        let (s, a) = step(s, E::UpdateMsg);
        assert_eq!(s.state, State::Idle);
        assert!(
            matches!(&a[0], A::SendNotification(n) if n.error == FsmError::UnexpectedMessageInOpenSent.into())
        );
    }

    #[test]
    fn manual_stop_sends_the_shutdown_message_and_does_not_restart() {
        let (s, _) = run(
            Session::new(false),
            vec![
                E::ManualStart,
                E::TcpCrAcked,
                E::BgpOpen { hold_time: 9 },
                E::KeepAliveMsg,
            ],
        );
        let (s, a) = step(s, E::ManualStop(Notify::admin_shutdown("bye")));
        assert_eq!(s.state, State::Idle);
        assert!(
            matches!(&a[0], A::SendNotification(n) if n.error == Cease::AdministrativeShutdown.into())
        );
        assert!(!a.contains(&A::ScheduleRestart));
    }

    #[test]
    fn collision_dump_sends_cease_7() {
        let (s, _) = run(Session::new(false), vec![E::ManualStart, E::TcpCrAcked]);
        let (s, a) = step(s, E::OpenCollisionDump);
        assert_eq!(s.state, State::Idle);
        assert!(
            matches!(&a[0], A::SendNotification(n) if n.error == Cease::ConnectionCollisionResolution.into())
        );
    }

    #[test]
    fn connect_failure_falls_back_to_active_then_retries() {
        let (s, _) = run(
            Session::new(false),
            vec![E::ManualStart, E::TcpConnectionFails],
        );
        assert_eq!(s.state, State::Active);
        let (s, a) = step(s, E::ConnectRetryTimerExpires);
        assert_eq!(s.state, State::Connect);
        assert!(a.contains(&A::InitiateTcp));
    }

    #[test]
    fn every_state_event_pair_is_total() {
        // No (state, event) pair panics, and Idle ignores everything but starts.
        let events = || {
            vec![
                E::ManualStart,
                E::ManualStop(Notify::admin_shutdown("x")),
                E::AutomaticStart,
                E::AutomaticStartWithPassiveTcpEstablishment,
                E::ConnectRetryTimerExpires,
                E::HoldTimerExpires,
                E::KeepaliveTimerExpires,
                E::TcpCrAcked,
                E::TcpConnectionConfirmed,
                E::TcpConnectionFails,
                E::BgpOpen { hold_time: 90 },
                E::BgpHeaderErr(Notify::new(
                    MessageHeaderError::ConnectionNotSynchronized,
                    vec![],
                    "x",
                )),
                E::BgpOpenMsgErr(Notify::new(OpenMessageError::BadPeerAs, vec![], "x")),
                E::OpenCollisionDump,
                E::NotifMsg,
                E::KeepAliveMsg,
                E::UpdateMsg,
                E::UpdateMsgErr(Notify::new(
                    UpdateMessageError::MalformedAttributeList,
                    vec![],
                    "x",
                )),
            ]
        };
        for state in [
            State::Idle,
            State::Connect,
            State::Active,
            State::OpenSent,
            State::OpenConfirm,
            State::Established,
        ] {
            for e in events() {
                let s = Session {
                    state,
                    passive: false,
                    hold_time: 9,
                };
                let (n, _) = step(s, e.clone());
                if state == State::Idle
                    && !matches!(
                        e,
                        E::ManualStart
                            | E::AutomaticStart
                            | E::AutomaticStartWithPassiveTcpEstablishment
                    )
                {
                    assert_eq!(n.state, State::Idle, "{e:?}");
                }
            }
        }
    }
}
