//! `starling-bgpd`'s control socket: its requests and replies, spoken as
//! JSON lines on a root-only Unix socket ([`crate::jsonl`]).

use crate::jsonl::{self, ErrorReply};
use crate::report::{RibSummary, RouteEntry, SessionStatus};
use crate::speaker::Speaker;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Sessions,
    Routes,
    Summary,
    Announce { prefix: IpNet },
    Withdraw { prefix: IpNet },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Sessions(Vec<SessionStatus>),
    Routes(Vec<RouteEntry>),
    Summary(RibSummary),
    Ok,
    Error(String),
}

impl ErrorReply for Reply {
    fn error(message: String) -> Reply {
        Reply::Error(message)
    }
}

/// How long the CLI waits for the daemon's reply.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Serve the control socket until the process ends.
pub async fn serve(path: &Path, speaker: Speaker) -> std::io::Result<()> {
    let listener = jsonl::bind(path)?;
    jsonl::serve(listener, move |req| answer(speaker.clone(), req)).await
}

async fn answer(speaker: Speaker, req: Request) -> Reply {
    match req {
        Request::Sessions => match speaker.sessions().await {
            Ok(s) => Reply::Sessions(s),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Summary => match speaker.summary().await {
            Ok(s) => Reply::Summary(s),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Routes => match speaker.routes().await {
            Ok(r) => Reply::Routes(r),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Announce { prefix } => match speaker.announce(prefix) {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::Withdraw { prefix } => match speaker.withdraw(prefix) {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Error(e.to_string()),
        },
    }
}

/// Send one request and wait for its reply (used by the CLI).
pub fn request(path: &Path, req: &Request) -> Result<Reply, String> {
    jsonl::request(path, req, REQUEST_DEADLINE).map_err(|e| match e {
        jsonl::RequestError::Connect { .. } => format!("{e} (is starling-bgpd running?)"),
        e => e.to_string(),
    })
}

/// The session table, in the shape of `calicoctl node status`.
pub fn session_table(sessions: &[SessionStatus]) -> String {
    let now = crate::session::now_unix();
    let mut rows = vec![[
        "PEER ADDRESS".to_string(),
        "PEER TYPE".into(),
        "STATE".into(),
        "SINCE".into(),
        "INFO".into(),
        "IN".into(),
        "OUT".into(),
    ]];
    for s in sessions {
        let age = now.saturating_sub(s.since);
        let since = format!(
            "{:02}:{:02}:{:02} ago",
            age / 3600,
            (age / 60) % 60,
            age % 60
        );
        let info = match (&s.state[..], &s.last_error) {
            ("Established", _) => "Established".to_string(),
            (_, Some(e)) => e.clone(),
            (st, None) => st.to_string(),
        };
        rows.push([
            s.peer.to_string(),
            format!("{} AS{}", s.kind, s.asn),
            s.state.clone(),
            since,
            info,
            s.prefixes_received.to_string(),
            s.prefixes_sent.to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let sep: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = sep.clone();
    for (n, r) in rows.iter().enumerate() {
        for (i, c) in r.iter().enumerate() {
            out.push_str(&format!("| {:w$} ", c, w = widths[i]));
        }
        out.push_str("|\n");
        if n == 0 {
            out.push_str(&sep);
        }
    }
    out.push_str(&sep);
    out
}
