//! `starling-bgpd`'s control socket: one JSON request per line, one JSON
//! reply per line, on a Unix socket that only root can open (mode 0600).

use crate::report::{RibSummary, RouteEntry, SessionStatus};
use crate::speaker::Speaker;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

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

/// Serve the control socket until the process ends.
pub async fn serve(path: &Path, speaker: Speaker) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let speaker = speaker.clone();
        tokio::spawn(async move {
            let _ = handle(stream, speaker).await;
        });
    }
}

async fn handle(stream: UnixStream, speaker: Speaker) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error(format!("bad request: {e}")),
            Ok(Request::Sessions) => match speaker.sessions().await {
                Ok(s) => Reply::Sessions(s),
                Err(e) => Reply::Error(e.to_string()),
            },
            Ok(Request::Summary) => match speaker.summary().await {
                Ok(s) => Reply::Summary(s),
                Err(e) => Reply::Error(e.to_string()),
            },
            Ok(Request::Routes) => match speaker.routes().await {
                Ok(r) => Reply::Routes(r),
                Err(e) => Reply::Error(e.to_string()),
            },
            Ok(Request::Announce { prefix }) => match speaker.announce(prefix) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e.to_string()),
            },
            Ok(Request::Withdraw { prefix }) => match speaker.withdraw(prefix) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e.to_string()),
            },
        };
        let mut out =
            serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"error\":\"encode\"}".to_vec());
        out.push(b'\n');
        wr.write_all(&out).await?;
    }
    Ok(())
}

/// Send one request and wait for its reply (used by the CLI).
pub fn request(path: &Path, req: &Request) -> Result<Reply, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot connect to the control socket {}: {e} (is starling-bgpd running?)",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply from starling-bgpd: {e}"))
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
