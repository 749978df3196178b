//! The BGP finite state machine of RFC 4271 §8, as a pure function:
//! `step(session, event) -> (session, actions)`. It performs no I/O and
//! reads no clock; the session driver turns actions into socket writes and
//! timers, and socket reads and timer expiries into events. Event names are
//! the RFC's (§8.1).

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
    /// Event 4.
    ManualStartWithPassiveTcpEstablishment,
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
    /// Event 24.
    NotifMsgVerErr,
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
    ProcessUpdate,
    /// The session reached Established.
    SessionUp,
    /// The session left Established: release its routes.
    SessionDown,
    /// Back in Idle after an error: start again automatically later
    /// (the driver's idle hold, RFC 4271 §8.1.1 DampPeerOscillations spirit).
    ScheduleRestart,
}

/// The FSM's own variables (§8: ConnectRetryCounter, the hold time and whether
/// this peer is passive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub state: State,
    pub connect_retry_counter: u32,
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
            connect_retry_counter: 0,
            passive,
            hold_time: 0,
        }
    }
}

/// One FSM transition.
pub fn step(mut s: Session, ev: Event) -> (Session, Vec<Action>) {
    use Action as A;
    use Event as E;
    use State::*;
    let mut acts = Vec::new();
    // Any error path: drop the connection, count it, go Idle and retry later.
    let fail = |s: &mut Session, acts: &mut Vec<Action>, notify: Option<Notify>| {
        if let Some(n) = notify {
            acts.push(A::SendNotification(n));
        }
        if s.state == Established {
            acts.push(A::SessionDown);
        }
        acts.push(A::StopConnectRetryTimer);
        acts.push(A::StartHoldTimer(0));
        acts.push(A::StartKeepaliveTimer(0));
        acts.push(A::DropTcp);
        acts.push(A::ScheduleRestart);
        s.connect_retry_counter += 1;
        s.state = Idle;
    };
    let fsm_error = |state: State| {
        let sub = match state {
            OpenSent => FsmError::UnexpectedMessageInOpenSent,
            OpenConfirm => FsmError::UnexpectedMessageInOpenConfirm,
            Established => FsmError::UnexpectedMessageInEstablished,
            _ => FsmError::Unspecified,
        };
        Notify::new(sub, vec![], format!("unexpected event in state {state}"))
    };
    match (s.state, ev) {
        // --- Idle (§8.2.2) ---
        (Idle, E::ManualStart | E::AutomaticStart) => {
            if s.passive {
                acts.push(A::StartConnectRetryTimer);
                s.state = Active;
            } else {
                acts.push(A::StartConnectRetryTimer);
                acts.push(A::InitiateTcp);
                s.state = Connect;
            }
        }
        (
            Idle,
            E::ManualStartWithPassiveTcpEstablishment
            | E::AutomaticStartWithPassiveTcpEstablishment,
        ) => {
            acts.push(A::StartConnectRetryTimer);
            s.state = Active;
        }
        (Idle, _) => {}

        // ManualStop in any other state (§8.2.2, all states).
        (_, E::ManualStop(n)) => {
            if matches!(s.state, OpenSent | OpenConfirm | Established) {
                acts.push(A::SendNotification(n));
            }
            if s.state == Established {
                acts.push(A::SessionDown);
            }
            acts.extend([
                A::StopConnectRetryTimer,
                A::StartHoldTimer(0),
                A::StartKeepaliveTimer(0),
                A::DropTcp,
            ]);
            s.connect_retry_counter = 0;
            s.state = Idle;
        }
        // Start events outside Idle are ignored.
        (
            _,
            E::ManualStart
            | E::AutomaticStart
            | E::ManualStartWithPassiveTcpEstablishment
            | E::AutomaticStartWithPassiveTcpEstablishment,
        ) => {}

        // --- Connect and Active ---
        (Connect | Active, E::ConnectRetryTimerExpires) => {
            acts.push(A::DropTcp);
            acts.push(A::StartConnectRetryTimer);
            if s.passive {
                s.state = Active;
            } else {
                acts.push(A::InitiateTcp);
                s.state = Connect;
            }
        }
        (Connect | Active, E::TcpCrAcked | E::TcpConnectionConfirmed) => {
            acts.extend([
                A::StopConnectRetryTimer,
                A::SendOpen,
                A::StartHoldTimer(LARGE_HOLD_TIME),
            ]);
            s.state = OpenSent;
        }
        (Connect, E::TcpConnectionFails) => {
            // §8.2.2 Connect, event 18: restart the timer, keep listening.
            acts.extend([A::DropTcp, A::StartConnectRetryTimer]);
            s.state = Active;
        }
        (Active, E::TcpConnectionFails) => {
            acts.extend([A::DropTcp, A::StartConnectRetryTimer]);
            s.connect_retry_counter += 1;
        }
        (Connect | Active, _) => fail(&mut s, &mut acts, None),

        // --- OpenSent ---
        (OpenSent, E::TcpConnectionFails) => {
            acts.extend([A::DropTcp, A::StartHoldTimer(0), A::StartConnectRetryTimer]);
            s.state = Active;
        }
        (OpenSent, E::BgpOpen { hold_time }) => {
            s.hold_time = hold_time;
            acts.push(A::SendKeepalive);
            if hold_time > 0 {
                acts.push(A::StartKeepaliveTimer((hold_time / 3).max(1)));
            }
            acts.push(A::StartHoldTimer(hold_time));
            s.state = OpenConfirm;
        }
        (OpenSent, E::HoldTimerExpires) => fail(
            &mut s,
            &mut acts,
            Some(Notify::new(
                ErrorCode::HoldTimerExpired,
                vec![],
                "hold timer expired in OpenSent",
            )),
        ),
        (
            OpenSent | OpenConfirm | Established,
            E::BgpHeaderErr(n) | E::BgpOpenMsgErr(n) | E::UpdateMsgErr(n),
        ) => fail(&mut s, &mut acts, Some(n)),
        (OpenSent | OpenConfirm, E::OpenCollisionDump) => fail(
            &mut s,
            &mut acts,
            Some(Notify::new(
                Cease::ConnectionCollisionResolution,
                vec![],
                "connection collision resolution (RFC 4271 §6.8)",
            )),
        ),
        (OpenSent | OpenConfirm | Established, E::NotifMsgVerErr | E::NotifMsg) => {
            fail(&mut s, &mut acts, None)
        }

        // --- OpenConfirm ---
        (OpenConfirm, E::KeepAliveMsg) => {
            acts.push(A::StartHoldTimer(s.hold_time));
            acts.push(A::SessionUp);
            s.state = Established;
        }
        (OpenConfirm | Established, E::KeepaliveTimerExpires) => {
            acts.push(A::SendKeepalive);
            acts.push(A::StartKeepaliveTimer((s.hold_time / 3).max(1)));
        }
        (OpenConfirm | Established, E::HoldTimerExpires) => fail(
            &mut s,
            &mut acts,
            Some(Notify::new(
                ErrorCode::HoldTimerExpired,
                vec![],
                "hold timer expired",
            )),
        ),
        (OpenConfirm | Established, E::TcpConnectionFails) => fail(&mut s, &mut acts, None),

        // --- Established ---
        (Established, E::KeepAliveMsg) => acts.push(A::StartHoldTimer(s.hold_time)),
        (Established, E::UpdateMsg) => {
            acts.push(A::ProcessUpdate);
            acts.push(A::StartHoldTimer(s.hold_time));
        }

        // Everything else is an FSM error (§8.2.2, "any other event").
        (state @ (OpenSent | OpenConfirm | Established), _) => {
            fail(&mut s, &mut acts, Some(fsm_error(state)))
        }
    }
    (s, acts)
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
        assert_eq!(s.connect_retry_counter, 1);
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
                E::ManualStartWithPassiveTcpEstablishment,
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
                E::NotifMsgVerErr,
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
                    connect_retry_counter: 0,
                    passive: false,
                    hold_time: 9,
                };
                let (n, _) = step(s, e.clone());
                if state == State::Idle
                    && !matches!(
                        e,
                        E::ManualStart
                            | E::AutomaticStart
                            | E::ManualStartWithPassiveTcpEstablishment
                            | E::AutomaticStartWithPassiveTcpEstablishment
                    )
                {
                    assert_eq!(n.state, State::Idle, "{e:?}");
                }
            }
        }
    }
}
