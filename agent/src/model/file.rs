//! The file datastore: one YAML stream of model objects, written like
//! kubectl YAML (`apiVersion`, `kind`, `metadata`, `spec`), loaded into a
//! [`Snapshot`] and reloaded when the file changes. A new file that does not
//! pass every check leaves the last good snapshot in place.

use super::calico::{self, Normalized, Target};
use super::crd::*;
use super::validate::{self, Finding};
use super::{Datastore, Snapshot};
use serde::Deserialize;
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How often the agent looks at the file unless told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// Linux keeps TCP-MD5 keys of at most this many bytes.
const MD5_KEY_MAX: usize = 80;

/// One reason a file was not loaded, as precisely located as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line in the file.
    pub line: Option<usize>,
    /// 1-based index of the document in the stream.
    pub document: Option<usize>,
    /// `Kind/name`, when known.
    pub object: Option<String>,
    /// Dotted path of the field, e.g. `spec.blockSize`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ":")?;
        match (self.document, &self.object) {
            (Some(d), Some(o)) => write!(f, " document {d} ({o}):")?,
            (Some(d), None) => write!(f, " document {d}:")?,
            _ => {}
        }
        if let Some(field) = &self.field {
            write!(f, " {field}:")?;
        }
        write!(f, " {}", self.message)
    }
}

/// Everything wrong with a file (all of it, so one edit can fix all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// One `---` separated document (or one item of a `List`, or a Calico
/// object turned into Starling's) and where it starts.
struct Document {
    /// What is parsed.
    text: String,
    /// The file's own text of it, when `text` is not (a List item, a
    /// normalised Calico object): fields are located in it.
    source: Option<String>,
    first_line: usize,
    index: usize,
    /// `Kind/name` as the file wrote it (a Calico Node is parsed as a
    /// StarlingNode).
    label: Option<String>,
}

impl Document {
    fn located_text(&self) -> &str {
        self.source.as_deref().unwrap_or(&self.text)
    }
}

fn split_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    let mut first_line = 1;
    let mut index = 0;
    let mut flush = |cur: &mut String, first_line: usize| {
        let blank = cur
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if !blank {
            index += 1;
            docs.push(Document {
                text: std::mem::take(cur),
                source: None,
                first_line,
                index,
                label: None,
            });
        }
        cur.clear();
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker || line == "..." {
            flush(&mut cur, first_line);
            first_line = n + 1;
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    flush(&mut cur, first_line);
    docs
}

fn strip_positions(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let skip = after
            .find(|c: char| !(c.is_ascii_digit() || c == ' ' || "column".contains(c)))
            .unwrap_or(after.len());
        rest = &after[skip..];
    }
    out.push_str(rest);
    out
}

/// The line of `path` (e.g. `spec.communities[0].value`) in `doc`: each
/// segment's key is looked for after the previous one's line.
fn field_line(doc: &Document, path: &str) -> usize {
    let lines: Vec<&str> = doc.located_text().lines().collect();
    let mut from = 0;
    let mut found = None;
    for seg in path.split('.') {
        let key = seg.split('[').next().unwrap_or(seg);
        let pat = format!("{key}:");
        let hit = lines[from.min(lines.len())..].iter().position(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix("- ").unwrap_or(t).trim_start();
            t.starts_with(&pat)
        });
        match hit {
            Some(p) => {
                found = Some(from + p);
                from += p + 1;
            }
            None => break,
        }
        // `key[i]`: the i-th `- ` item of the block list under the key (the
        // next key may sit on the item's own line).
        let index = seg
            .split_once('[')
            .and_then(|(_, i)| i.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(index) = index {
            let mut items = lines[from.min(lines.len())..]
                .iter()
                .enumerate()
                .filter_map(|(j, l)| {
                    let t = l.trim_start();
                    (t.starts_with("- ") || t == "-").then_some((j, l.len() - t.len()))
                });
            let Some((j0, indent)) = items.next() else {
                break;
            };
            let item = std::iter::once((j0, indent))
                .chain(items.filter(|(_, i)| *i == indent))
                .nth(index);
            match item {
                Some((j, _)) => {
                    found = Some(from + j);
                    from += j;
                }
                None => break,
            }
        }
    }
    doc.first_line + found.unwrap_or(0)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<HeaderMeta>,
}

#[derive(Deserialize)]
struct HeaderMeta {
    name: Option<String>,
}

/// Only what the model uses of `metadata`; the rest (uid, resourceVersion,
/// ... in exported YAML) is ignored.
#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Object<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Meta,
    #[serde(default = "Option::default")]
    spec: Option<S>,
    #[allow(dead_code)]
    #[serde(default)]
    status: Option<IgnoredAny>,
}

impl Meta {
    fn into_object_meta(self) -> kube::core::ObjectMeta {
        kube::core::ObjectMeta {
            name: Some(self.name),
            labels: (!self.labels.is_empty()).then_some(self.labels),
            annotations: (!self.annotations.is_empty()).then_some(self.annotations),
            ..Default::default()
        }
    }
}

/// Loads and checks one file; collects every problem.
struct Loader<'a> {
    file: &'a Path,
    problems: Vec<Problem>,
    /// Accepted, but not (all) acted on: Calico fields Starling does not
    /// implement, stored fields, kinds left out.
    warnings: Vec<Problem>,
    /// File: passwords are read now. Kubernetes: they stay references.
    target: Target,
    /// `import-calico`: every object loaded, as Starling YAML, in order.
    emitted: Option<Vec<String>>,
}

impl Loader<'_> {
    fn problem(
        &mut self,
        doc: Option<&Document>,
        object: Option<String>,
        field: Option<&str>,
        message: impl Into<String>,
    ) {
        let line = match (doc, field) {
            (Some(d), Some(f)) => Some(field_line(d, f)),
            (Some(d), None) => Some(d.first_line),
            _ => None,
        };
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            document: doc.map(|d| d.index),
            object,
            field: field.map(str::to_string),
            message: message.into(),
        });
    }

    fn warning(&mut self, doc: &Document, object: &str, f: Finding) {
        self.warnings.push(Problem {
            file: self.file.to_path_buf(),
            line: Some(field_line(doc, &f.field)),
            document: Some(doc.index),
            object: Some(object.to_string()),
            field: Some(f.field),
            message: f.message,
        });
    }

    fn emit<T: Serialize>(&mut self, object: &T) {
        if let Some(out) = &mut self.emitted {
            match serde_yaml::to_string(object) {
                Ok(y) => out.push(y),
                Err(e) => self.problems.push(Problem {
                    file: self.file.to_path_buf(),
                    line: None,
                    document: None,
                    object: None,
                    field: None,
                    message: format!("cannot write the imported object: {e}"),
                }),
            }
        }
    }

    fn yaml_error(&mut self, doc: &Document, object: Option<String>, e: &serde_yaml::Error) {
        // serde_yaml writes positions as " at line L column C", relative
        // to the document; the file line replaces them.
        let text = strip_positions(&e.to_string());
        // ... and prefixes the path of the field when there is one.
        let (field, message) = match text.split_once(": ") {
            Some((path, rest)) if !path.contains(' ') && !path.is_empty() => {
                (Some(path.to_string()), rest.to_string())
            }
            _ => (None, text),
        };
        // Without serde's position (a List item, a normalised Calico
        // object), an unknown field is found under its parent.
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split_once('`'))
            .map(|(name, _)| name);
        let line = e
            .location()
            .filter(|_| doc.source.is_none())
            .map(|l| doc.first_line + l.line().saturating_sub(1))
            .or_else(|| match (field.as_deref(), unknown) {
                (Some(f), Some(u)) => Some(field_line(doc, &format!("{f}.{u}"))),
                (None, Some(u)) => Some(field_line(doc, u)),
                _ => None,
            })
            .or_else(|| field.as_deref().map(|f| field_line(doc, f)))
            .unwrap_or(doc.first_line);
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line: Some(line),
            document: Some(doc.index),
            object,
            field,
            message,
        });
    }

    fn findings(&mut self, doc: &Document, object: &str, findings: Vec<Finding>) {
        for f in findings {
            self.problem(
                Some(doc),
                Some(object.to_string()),
                Some(&f.field),
                f.message,
            );
        }
    }

    fn parse<S: DeserializeOwned>(
        &mut self,
        doc: &Document,
        object: &str,
        spec_required: bool,
    ) -> Option<(kube::core::ObjectMeta, Option<S>)> {
        match serde_yaml::from_str::<Object<S>>(&doc.text) {
            Ok(o) => {
                let findings = validate::name(&o.metadata.name);
                let bad_name = !findings.is_empty();
                self.findings(doc, object, findings);
                if spec_required && o.spec.is_none() {
                    self.problem(
                        Some(doc),
                        Some(object.to_string()),
                        Some("spec"),
                        "spec is missing",
                    );
                    return None;
                }
                (!bad_name).then(|| (o.metadata.into_object_meta(), o.spec))
            }
            Err(e) => {
                self.yaml_error(doc, Some(object.to_string()), &e);
                None
            }
        }
    }

    /// One document: a List's items one by one, Calico YAML through
    /// [`calico::normalize`], Starling's own kinds as they are.
    fn document(&mut self, doc: &Document, snap: &mut Snapshot) {
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc.text) {
            Ok(v) => v,
            Err(e) => return self.yaml_error(doc, None, &e),
        };
        let s = |k: &str| value.get(k).and_then(serde_yaml::Value::as_str);
        let (api_version, kind) = (s("apiVersion").unwrap_or_default(), s("kind"));
        if let (Some(kind), Some(serde_yaml::Value::Sequence(items))) = (kind, value.get("items"))
            && kind.ends_with("List")
        {
            let starts: Vec<usize> = (0..items.len())
                .map(|i| field_line(doc, &format!("items[{i}]")))
                .collect();
            let lines: Vec<&str> = doc.located_text().lines().collect();
            for (i, item) in items.iter().enumerate() {
                let from = starts[i].saturating_sub(doc.first_line);
                let to = starts
                    .get(i + 1)
                    .map(|l| l.saturating_sub(doc.first_line))
                    .unwrap_or(lines.len())
                    .max(from);
                let source = lines[from.min(lines.len())..to.min(lines.len())].join("\n");
                let text = match serde_yaml::to_string(item) {
                    Ok(t) => t,
                    Err(e) => return self.yaml_error(doc, None, &e),
                };
                let sub = Document {
                    text,
                    source: Some(source),
                    first_line: starts[i],
                    index: doc.index,
                    label: None,
                };
                self.document(&sub, snap);
            }
            return;
        }
        let Some(kind) = kind else {
            return self.native(doc, snap);
        };
        if !calico::is_calico(api_version, kind) {
            return self.native(doc, snap);
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default();
        let object = format!("{kind}/{name}");
        match calico::normalize(&value, self.target) {
            Normalized::Object {
                value, warnings, ..
            } => {
                for w in warnings {
                    self.warning(doc, &object, w);
                }
                let text = match serde_yaml::to_string(&value) {
                    Ok(t) => t,
                    Err(e) => return self.yaml_error(doc, Some(object), &e),
                };
                let sub = Document {
                    text,
                    source: Some(doc.located_text().to_string()),
                    first_line: doc.first_line,
                    index: doc.index,
                    label: Some(object),
                };
                self.native(&sub, snap);
            }
            Normalized::Skipped { warnings } => {
                for w in warnings {
                    self.warning(doc, &object, w);
                }
            }
            Normalized::Refused { problems } => self.findings(doc, &object, problems),
        }
    }

    /// A Starling object (or a normalised Calico one).
    fn native(&mut self, doc: &Document, snap: &mut Snapshot) {
        let header: Header = match serde_yaml::from_str(&doc.text) {
            Ok(h) => h,
            Err(e) => return self.yaml_error(doc, None, &e),
        };
        let Some(kind) = header.kind else {
            return self.problem(Some(doc), None, Some("kind"), "kind is missing");
        };
        let name = header.metadata.and_then(|m| m.name).unwrap_or_default();
        let object = doc
            .label
            .clone()
            .unwrap_or_else(|| format!("{kind}/{name}"));
        let calico_kind = matches!(kind.as_str(), "IPPool" | "BGPConfiguration" | "BGPPeer");
        let api_version = header.api_version.unwrap_or_default();
        let ours = format!("{GROUP}/{VERSION}");
        if api_version != ours && !(calico_kind && api_version == CALICO_API_VERSION) {
            let also = if calico_kind {
                format!(
                    " or {CALICO_API_VERSION} or {}",
                    calico::CALICO_CRD_API_VERSION
                )
            } else {
                String::new()
            };
            return self.problem(
                Some(doc),
                Some(object),
                Some("apiVersion"),
                format!("apiVersion `{api_version}` is not served here: use {ours}{also}"),
            );
        }
        if name.is_empty() {
            return self.problem(
                Some(doc),
                Some(object),
                Some("metadata.name"),
                "metadata.name is missing",
            );
        }
        let dup = match kind.as_str() {
            "IPPool" => snap.pools.contains_key(&name),
            "BGPConfiguration" => snap.bgp_configuration.is_some(),
            "BGPPeer" => snap.peers.contains_key(&name),
            "StarlingNode" => snap.nodes.contains_key(&name),
            "BlockAffinity" => snap.affinities.contains_key(&name),
            "IPReservation" => snap.reservations.contains_key(&name),
            _ => false,
        };
        if dup {
            return self.problem(
                Some(doc),
                Some(object),
                Some("metadata.name"),
                format!("a second {kind} named `{name}`: names are unique per kind"),
            );
        }
        self.load_kind(doc, snap, &kind, name, object);
    }

    /// Load one object whose header passed: checked, then into `snap`.
    fn load_kind(
        &mut self,
        doc: &Document,
        snap: &mut Snapshot,
        kind: &str,
        name: String,
        object: String,
    ) {
        match kind {
            "IPPool" => {
                if let Some((metadata, Some(spec))) = self.parse::<IPPoolSpec>(doc, &object, true) {
                    let f = validate::ip_pool(&spec);
                    if f.is_empty() {
                        if let Some((other, _)) = snap.pools.iter().find(|(_, p)| {
                            p.spec.cidr.contains(&spec.cidr.addr()) || spec.cidr.contains(&p.spec.cidr.addr())
                        }) {
                            let msg = format!("{} overlaps IPPool `{other}`", spec.cidr);
                            self.problem(Some(doc), Some(object), Some("spec.cidr"), msg);
                            return;
                        }
                        let pool = IPPool { metadata, spec };
                        self.emit(&pool);
                        snap.pools.insert(name, pool);
                    }
                    self.findings(doc, &object, f);
                }
            }
            "BGPConfiguration" => {
                if let Some((metadata, spec)) = self.parse::<BGPConfigurationSpec>(doc, &object, false) {
                    let spec = spec.unwrap_or_default();
                    let mut f = validate::bgp_configuration(&name, &spec);
                    if let Some(p) = &spec.node_mesh_password {
                        self.password(p, "spec.nodeMeshPassword", snap, &mut f);
                    }
                    if f.is_empty() {
                        for w in validate::unsupported_bgp_configuration(&spec) {
                            self.warning(doc, &object, w);
                        }
                        let config = BGPConfiguration { metadata, spec };
                        self.emit(&config);
                        snap.bgp_configuration = Some(config);
                    }
                    self.findings(doc, &object, f);
                }
            }
            "BGPPeer" => {
                if let Some((metadata, Some(spec))) = self.parse::<BGPPeerSpec>(doc, &object, true) {
                    let mut f = validate::bgp_peer(&spec);
                    if let Some(p) = &spec.password {
                        self.password(p, "spec.password", snap, &mut f);
                    }
                    if f.is_empty() {
                        for w in validate::unsupported_bgp_peer(&spec) {
                            self.warning(doc, &object, w);
                        }
                        let peer = BGPPeer { metadata, spec };
                        self.emit(&peer);
                        snap.peers.insert(name, peer);
                    }
                    self.findings(doc, &object, f);
                }
            }
            "StarlingNode" => {
                if let Some((metadata, Some(spec))) = self.parse::<StarlingNodeSpec>(doc, &object, true) {
                    let f = validate::starling_node(&spec);
                    if f.is_empty() {
                        let node = StarlingNode { metadata, spec };
                        self.emit(&node);
                        snap.nodes.insert(name, node);
                    }
                    self.findings(doc, &object, f);
                }
            }
            "BlockAffinity" => {
                if let Some((metadata, Some(spec))) = self.parse::<BlockAffinitySpec>(doc, &object, true) {
                    let f = validate::block_affinity(&spec);
                    if f.is_empty() {
                        let affinity = BlockAffinity { metadata, spec };
                        self.emit(&affinity);
                        snap.affinities.insert(name, affinity);
                    }
                    self.findings(doc, &object, f);
                }
            }
            "IPReservation" => self.load_reservation(doc, &object, name, snap),
            // Calico's or ours: checked and loaded; peers name it in spec.filters.
            "BGPFilter" => self.load_filter(doc, &object, name, snap),
            other => self.problem(
                Some(doc),
                Some(object.clone()),
                Some("kind"),
                format!(
                    "unknown kind `{other}`: expected IPPool, BGPConfiguration, BGPPeer, BGPFilter, StarlingNode, BlockAffinity or IPReservation"
                ),
            ),
        }
    }

    /// An IPReservation: kept for IPAM.
    fn load_reservation(
        &mut self,
        doc: &Document,
        object: &str,
        name: String,
        snap: &mut Snapshot,
    ) {
        if let Some((metadata, Some(spec))) = self.parse::<IPReservationSpec>(doc, object, true) {
            let r = IPReservation { metadata, spec };
            self.emit(&r);
            snap.reservations.insert(name, r);
        }
    }

    /// A BGPFilter (Calico's or ours): checked, its differences from Calico
    /// warned about, kept for the peers that name it, and emitted as
    /// `starling.dev/v1` by `import-calico`.
    fn load_filter(&mut self, doc: &Document, object: &str, name: String, snap: &mut Snapshot) {
        let Some((metadata, spec)) = self.parse::<calico::BGPFilterSpec>(doc, object, false) else {
            return;
        };
        let spec = spec.unwrap_or_default();
        let f = calico::bgp_filter(&spec);
        if f.is_empty() {
            for w in calico::bgp_filter_warnings(&spec) {
                self.warning(doc, object, w);
            }
            self.emit(&super::crd::BGPFilter {
                metadata,
                spec: spec.clone(),
            });
            snap.filters.insert(name, spec);
        }
        self.findings(doc, object, f);
    }

    /// Resolve a password now, so the peering plan stays pure and a missing
    /// file is reported with the rest of the file's problems.
    fn password(&mut self, p: &Password, field: &str, snap: &mut Snapshot, out: &mut Vec<Finding>) {
        if self.target == Target::Kubernetes {
            return; // the Kubernetes datastore resolves Secrets itself
        }
        if p.secret_key_ref.is_some() {
            out.push(Finding {
                field: format!("{field}.secretKeyRef"),
                message:
                    "secretKeyRef needs the Kubernetes datastore: in a file, use `file: /path`"
                        .into(),
            });
            return;
        }
        let Some(path) = &p.file else { return };
        if !path.is_absolute() {
            return; // validate reports it
        }
        let field = format!("{field}.file");
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let key = text.lines().next().unwrap_or("").trim_end_matches('\r');
                if key.is_empty() {
                    out.push(Finding {
                        field,
                        message: format!("password file {} is empty", path.display()),
                    });
                } else if key.len() > MD5_KEY_MAX {
                    out.push(Finding {
                        field,
                        message: format!(
                            "the password in {} is {} bytes; TCP-MD5 keys hold at most {MD5_KEY_MAX}",
                            path.display(),
                            key.len()
                        ),
                    });
                } else {
                    snap.passwords.insert(p.clone(), key.to_string());
                    snap.password_files.insert(path.clone());
                }
            }
            Err(e) => out.push(Finding {
                field,
                message: format!("cannot read password file {}: {e}", path.display()),
            }),
        }
    }
}

/// A loaded file and what it says that Starling does not act on.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// Accepted fields and objects Starling does not (fully) act on, each
    /// saying what Starling does instead; same shape as problems.
    pub warnings: Vec<Problem>,
}

/// What a stream is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// As the file datastore loads it (password files are read).
    #[default]
    File,
    /// As objects for the Kubernetes datastore: passwords stay
    /// references (`secretKeyRef`), a Calico Node's labels are left to the
    /// Node.
    Kubernetes,
}

fn run(
    file: &Path,
    text: &str,
    mode: Mode,
    emit: bool,
) -> (Result<Snapshot, LoadError>, Vec<Problem>, Vec<String>) {
    let mut loader = Loader {
        file,
        problems: Vec::new(),
        warnings: Vec::new(),
        target: match mode {
            Mode::File => Target::File,
            Mode::Kubernetes => Target::Kubernetes,
        },
        emitted: emit.then(Vec::new),
    };
    let mut snap = Snapshot::default();
    for doc in split_documents(text) {
        loader.document(&doc, &mut snap);
    }
    let result = if loader.problems.is_empty() {
        Ok(snap)
    } else {
        Err(LoadError {
            problems: loader.problems,
        })
    };
    (result, loader.warnings, loader.emitted.unwrap_or_default())
}

/// Parse and check a YAML stream; `file` names it in problems. Password
/// files it names are read. Warnings are dropped: see [`check_str`].
pub fn load_str(file: &Path, text: &str) -> Result<Snapshot, LoadError> {
    run(file, text, Mode::File, false).0
}

/// Like [`load_str`], with the warnings; these come also when there are
/// problems.
pub fn check_str(file: &Path, text: &str, mode: Mode) -> (Result<Loaded, LoadError>, Vec<Problem>) {
    let (result, warnings, _) = run(file, text, mode, false);
    let result = result.map(|snapshot| Loaded {
        snapshot,
        warnings: warnings.clone(),
    });
    (result, warnings)
}

/// `starlingctl import-calico`: the stream as Starling's own kinds
/// (`starling.dev/v1`) for the Kubernetes datastore, one YAML document per
/// object loaded, with the warnings about what was not carried over.
pub fn import_str(file: &Path, text: &str) -> (Result<String, LoadError>, Vec<Problem>) {
    let (result, warnings, emitted) = run(file, text, Mode::Kubernetes, true);
    let result = result.map(|_| {
        let mut out = format!(
            "# Imported by `starlingctl import-calico` from {}.\n",
            file.display()
        );
        for doc in emitted {
            out.push_str("---\n");
            out.push_str(&doc);
        }
        out
    });
    (result, warnings)
}

fn unreadable(file: &Path, e: std::io::Error) -> LoadError {
    LoadError {
        problems: vec![Problem {
            file: file.to_path_buf(),
            line: None,
            document: None,
            object: None,
            field: None,
            message: format!("cannot read: {e}"),
        }],
    }
}

pub fn load_file(file: &Path) -> Result<Snapshot, LoadError> {
    check_file(file, Mode::File).0.map(|l| l.snapshot)
}

/// [`check_str`] of a file.
pub fn check_file(file: &Path, mode: Mode) -> (Result<Loaded, LoadError>, Vec<Problem>) {
    match std::fs::read_to_string(file) {
        Ok(text) => check_str(file, &text, mode),
        Err(e) => (Err(unreadable(file, e)), Vec::new()),
    }
}

/// Load for the agent: what the file says that Starling does not act on is
/// logged, at start and at every reload.
fn load_logged(path: &Path) -> Result<Snapshot, LoadError> {
    let (result, _) = check_file(path, Mode::File);
    let loaded = result?;
    for w in &loaded.warnings {
        warn!("model: {w}");
    }
    Ok(loaded.snapshot)
}

/// What identifies one version of a file: a replace by rename changes the
/// inode, an edit in place the mtime or size.
type Fingerprint = Option<(u64, u64, i64, i64, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

fn fingerprints(file: &Path, snap: &Snapshot) -> Vec<Fingerprint> {
    std::iter::once(file)
        .chain(snap.password_files.iter().map(PathBuf::as_path))
        .map(fingerprint)
        .collect()
}

/// The file datastore: the snapshot of one file, polled for changes.
pub struct FileDatastore {
    path: PathBuf,
    tx: watch::Sender<Arc<Snapshot>>,
    last_error: Arc<Mutex<Option<LoadError>>>,
    /// Dropping it stops the poller.
    stop: Option<mpsc::Sender<()>>,
    poller: Option<JoinHandle<()>>,
}

impl FileDatastore {
    /// Load `path` (it must be good) and watch it, checking every `poll`
    /// ([`DEFAULT_POLL`] normally).
    pub fn open(path: impl Into<PathBuf>, poll: Duration) -> Result<FileDatastore, LoadError> {
        let path = path.into();
        let first = load_logged(&path)?;
        let mut seen = fingerprints(&path, &first);
        let (tx, _) = watch::channel(Arc::new(first));
        let last_error = Arc::new(Mutex::new(None));
        let (stop, stopped) = mpsc::channel::<()>();
        let poller = {
            let (watched, tx, last_error) = (path.clone(), tx.clone(), last_error.clone());
            std::thread::Builder::new()
                .name("model-file".into())
                .spawn(move || {
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(poll) {
                        let path = &watched;
                        let now = fingerprints(path, &tx.borrow());
                        if now == seen {
                            continue;
                        }
                        match load_logged(path) {
                            Ok(snap) => {
                                seen = fingerprints(path, &snap);
                                info!(file = %path.display(), "model reloaded");
                                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                                tx.send_if_modified(|cur| {
                                    let changed = **cur != snap;
                                    if changed {
                                        *cur = Arc::new(snap);
                                    }
                                    changed
                                });
                            }
                            Err(e) => {
                                seen = now;
                                warn!(file = %path.display(), "keeping the last good model: {e}");
                                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            }
                        }
                    }
                })
                .map_err(|e| LoadError {
                    problems: vec![Problem {
                        file: path.clone(),
                        line: None,
                        document: None,
                        object: None,
                        field: None,
                        message: format!("cannot start the file watcher: {e}"),
                    }],
                })?
        };
        Ok(FileDatastore {
            path,
            tx,
            last_error,
            stop: Some(stop),
            poller: Some(poller),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the newest version of the file was refused, if it was.
    pub fn last_error(&self) -> Option<LoadError> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Datastore for FileDatastore {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}

impl Drop for FileDatastore {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const GOOD: &str = "\
# the lab
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: pods
spec:
  cidr: 10.244.0.0/16
  ipipMode: CrossSubnet
  natOutgoing: true
  nodeSelector: all()
---
apiVersion: starling.dev/v1
kind: BGPConfiguration
metadata:
  name: default
spec:
  nodeToNodeMeshEnabled: false
  asNumber: 65001
---
apiVersion: starling.dev/v1
kind: StarlingNode
metadata:
  name: node-a
  labels:
    rack: r1
spec:
  ipv4Address: 192.0.2.10/24
  routeReflectorClusterID: 224.0.0.1
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: tor
spec:
  peerIP: 192.0.2.1:1179
  asNumber: 65100
  nodeSelector: rack == 'r1'
  keepaliveTime: 20s
";

    fn load(text: &str) -> Result<Snapshot, LoadError> {
        load_str(Path::new("model.yaml"), text)
    }

    #[test]
    fn loads_a_stream_with_defaults() {
        let s = load(GOOD).unwrap();
        let pool = &s.pools["pods"].spec;
        assert_eq!(pool.block_size(), 26);
        assert_eq!(pool.ipip_mode, IpipMode::CrossSubnet);
        assert_eq!(s.bgp().as_number, 65001);
        assert!(!s.bgp().node_to_node_mesh_enabled);
        assert_eq!(s.bgp().listen_port, 179);
        assert_eq!(
            s.bgp().node_mesh_max_restart_time.0,
            Duration::from_secs(120)
        );
        assert_eq!(s.labels("node-a")["rack"], "r1");
        let tor = &s.peers["tor"].spec;
        assert_eq!(tor.peer_ip.unwrap().port, Some(1179));
        assert_eq!(tor.source_address, SourceAddress::UseNodeIP);
    }

    #[test]
    fn empty_file_is_the_default_model() {
        let s = load("# nothing yet\n---\n").unwrap();
        assert!(s.bgp().node_to_node_mesh_enabled);
        assert_eq!(s.bgp().as_number, DEFAULT_AS_NUMBER);
    }

    fn only_problem(text: &str) -> Problem {
        let e = load(text).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        e.problems[0].clone()
    }

    #[test]
    fn problems_name_line_and_field() {
        let text = GOOD.replace(
            "  ipipMode: CrossSubnet",
            "  ipipMode: CrossSubnet\n  blockSize: 40",
        );
        let p = only_problem(&text);
        assert_eq!(p.line, Some(9), "{p}");
        assert_eq!(p.field.as_deref(), Some("spec.blockSize"), "{p}");
        assert_eq!(p.document, Some(1));
        assert_eq!(p.object.as_deref(), Some("IPPool/pods"));

        // A serde error: the unknown field, in the fourth document.
        let text = GOOD.replace("  keepaliveTime: 20s", "  keepAliveTime: 20s");
        let p = only_problem(&text);
        assert_eq!(p.document, Some(4));
        assert_eq!(
            p.line,
            Some(
                text.lines()
                    .position(|l| l.contains("keepAliveTime"))
                    .unwrap()
                    + 1
            )
        );
        assert!(p.message.contains("keepAliveTime"), "{p}");

        // A value of the wrong shape.
        let text = GOOD.replace("ipv4Address: 192.0.2.10/24", "ipv4Address: 192.0.2.300/24");
        let p = only_problem(&text);
        assert_eq!(
            p.line,
            Some(
                text.lines()
                    .position(|l| l.contains("192.0.2.300"))
                    .unwrap()
                    + 1
            ),
            "{p}"
        );
        assert_eq!(p.field.as_deref(), Some("spec.ipv4Address"), "{p}");
    }

    #[test]
    fn list_items_are_located() {
        let text = GOOD.replace(
            "  asNumber: 65001\n",
            "  asNumber: 65001\n  communities:\n  - name: a\n    value: 1:2\n  - name: b\n    value: 1:2:x\n",
        );
        let p = only_problem(&text);
        assert_eq!(p.field.as_deref(), Some("spec.communities[1].value"), "{p}");
        let want = text.lines().position(|l| l.contains("1:2:x")).unwrap() + 1;
        assert_eq!(p.line, Some(want), "{p}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = format!(
            "{GOOD}---\napiVersion: v1\nkind: IPPool\nmetadata:\n  name: x\n---\nkind: Widget\napiVersion: starling.dev/v1\nmetadata:\n  name: w\n---\napiVersion: starling.dev/v1\nkind: BGPConfiguration\nmetadata:\n  name: main\n"
        );
        let e = load(&text).unwrap_err();
        let fields: Vec<_> = e
            .problems
            .iter()
            .map(|p| p.field.clone().unwrap_or_default())
            .collect();
        assert_eq!(fields, ["apiVersion", "kind", "metadata.name"], "{e}");
    }

    #[test]
    fn cross_object_checks() {
        let overlap = format!(
            "{GOOD}---\napiVersion: starling.dev/v1\nkind: IPPool\nmetadata:\n  name: more\nspec:\n  cidr: 10.244.64.0/18\n"
        );
        let p = only_problem(&overlap);
        assert!(p.message.contains("overlaps IPPool `pods`"), "{p}");
        let twice = format!(
            "{GOOD}---\napiVersion: starling.dev/v1\nkind: StarlingNode\nmetadata:\n  name: node-a\nspec:\n  ipv6Address: 2001:db8::1/64\n"
        );
        assert!(only_problem(&twice).message.contains("second StarlingNode"));
        let secret = GOOD.replace(
            "  keepaliveTime: 20s",
            "  password:\n    secretKeyRef: {name: bgp, key: tor}",
        );
        let p = only_problem(&secret);
        assert_eq!(
            p.field.as_deref(),
            Some("spec.password.secretKeyRef"),
            "{p}"
        );
    }

    #[test]
    fn password_files_are_read() {
        let dir = std::env::temp_dir().join(format!("starling-model-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("tor.key");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let text = GOOD.replace(
            "  keepaliveTime: 20s",
            &format!("  password:\n    file: {}", pw.display()),
        );
        let s = load(&text).unwrap();
        let p = s.peers["tor"].spec.password.as_ref().unwrap();
        assert_eq!(s.passwords[p], "s3cret");
        std::fs::remove_file(&pw).unwrap();
        let p = only_problem(&text);
        assert!(p.message.contains("cannot read password file"), "{p}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reloads_and_keeps_the_last_good_snapshot() {
        let dir =
            std::env::temp_dir().join(format!("starling-model-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.yaml");
        let write = |text: &str| {
            let tmp = dir.join("model.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write(GOOD);
        let ds = FileDatastore::open(&path, Duration::from_millis(20)).unwrap();
        let mut rx = ds.subscribe();
        assert_eq!(ds.snapshot().bgp().as_number, 65001);

        write(&GOOD.replace("asNumber: 65001", "asNumber: 65002"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ds.snapshot().bgp().as_number != 65002 {
            assert!(Instant::now() < deadline, "no reload");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();

        write(&GOOD.replace("asNumber: 65001", "asNumber: lots"));
        while ds.last_error().is_none() {
            assert!(Instant::now() < deadline, "bad file not noticed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ds.snapshot().bgp().as_number, 65002);
        assert!(!rx.has_changed().unwrap());
        drop(ds);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
