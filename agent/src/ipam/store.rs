//! The node's allocations, persisted in redb. A write transaction commits
//! (fsync) before the agent answers the plugin, so a reply always describes
//! durable state; redb's copy-on-write commit means a `kill -9` at any point
//! leaves either the old or the new set of allocations, never a mix.
//!
//! What is on disk is the store's own `Record`, with an explicit version,
//! not the CNI protocol's [`Allocation`]: the two are converted here, so a
//! change to the wire types can never change (or strand) what a node has
//! stored.

use ipnet::IpNet;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use starling_cni_proto::{Allocation, AttachmentKey, PodRef};
use std::path::{Path, PathBuf};

/// Attachment key (`network/containerID/ifname`, or `containerID/ifname`
/// for records stored before keys named their network; none of the three
/// may contain `/`) to the `Record` as JSON.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");

/// The record version this code writes, and the newest it reads.
const RECORD_VERSION: u32 = 2;

/// One attachment's allocation as stored.
///
/// Versions:
/// - 0 (no `version` field): written by agents before records had a type
///   of their own (the CNI `Allocation` of that time as JSON); its fields
///   are exactly those of version 1.
/// - 1: the same fields, with `"version": 1`.
/// - 2: adds `key.network` (the network configuration's name),
///   `allocatedUnixMs` and `pod` (`{namespace, name}` from the runtime's
///   `CNI_ARGS`, absent when the runtime named no pod); versions 0 and 1
///   read with an empty network, time 0 (unknown) and no pod.
///
/// A field added later gets a default (so older records still read) and a
/// new version number; a record newer than this code is refused by name
/// rather than misread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    #[serde(default)]
    version: u32,
    key: RecordKey,
    /// Host prefixes: a /32 for IPv4, a /128 for IPv6.
    ips: Vec<IpNet>,
    host_veth: String,
    netns: String,
    #[serde(default)]
    allocated_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<RecordPod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordPod {
    namespace: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordKey {
    #[serde(default)]
    network: String,
    container_id: String,
    ifname: String,
}

impl From<&Allocation> for Record {
    fn from(a: &Allocation) -> Record {
        Record {
            version: RECORD_VERSION,
            key: RecordKey {
                network: a.key.network.clone(),
                container_id: a.key.container_id.clone(),
                ifname: a.key.ifname.clone(),
            },
            ips: a.ips.clone(),
            host_veth: a.host_veth.clone(),
            netns: a.netns.clone(),
            allocated_unix_ms: a.allocated_unix_ms,
            pod: a.pod.as_ref().map(|p| RecordPod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            }),
        }
    }
}

impl From<Record> for Allocation {
    fn from(r: Record) -> Allocation {
        Allocation {
            key: AttachmentKey {
                network: r.key.network,
                container_id: r.key.container_id,
                ifname: r.key.ifname,
            },
            ips: r.ips,
            host_veth: r.host_veth,
            netns: r.netns,
            allocated_unix_ms: r.allocated_unix_ms,
            pod: r.pod.map(|p| PodRef {
                namespace: p.namespace,
                name: p.name,
            }),
        }
    }
}

/// Read one stored value; `key` names it in errors.
fn decode(key: &str, value: &[u8]) -> Result<Allocation, String> {
    let record: Record = serde_json::from_slice(value).map_err(|e| format!("entry {key}: {e}"))?;
    if record.version > RECORD_VERSION {
        return Err(format!(
            "entry {key}: record version {} was written by a newer agent (this one reads up to \
             {RECORD_VERSION}); run that version again or remove the store",
            record.version
        ));
    }
    Ok(record.into())
}

#[derive(Debug, thiserror::Error)]
#[error("allocation store {path}: {reason}")]
pub struct StoreError {
    pub path: PathBuf,
    pub reason: String,
}

/// One change to the store; a batch of them commits atomically.
#[derive(Debug, Clone)]
pub enum Change {
    Put(Allocation),
    Remove(AttachmentKey),
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

fn key(k: &AttachmentKey) -> String {
    if k.network.is_empty() {
        format!("{}/{}", k.container_id, k.ifname)
    } else {
        format!("{}/{}/{}", k.network, k.container_id, k.ifname)
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(&e))?;
        // Create the table up front so a fresh store reads as empty.
        let tx = db.begin_write().map_err(|e| err(&e))?;
        tx.open_table(ALLOCATIONS).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        Ok(Store {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Every allocation, to rebuild the in-memory view at start.
    pub fn load(&self) -> Result<Vec<Allocation>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(ALLOCATIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push(decode(k.value(), v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    /// Apply `changes` in one durable transaction.
    pub fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(ALLOCATIONS).map_err(|e| self.err(e))?;
            for change in changes {
                match change {
                    Change::Put(a) => {
                        let body = serde_json::to_vec(&Record::from(a)).map_err(|e| self.err(e))?;
                        table
                            .insert(key(&a.key).as_str(), body.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Change::Remove(k) => {
                        table.remove(key(k).as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written by the code of commit 32c6832 (before the store had
    /// its own record type) still opens, with every allocation as it was
    /// written. agent/tests/fixtures/README.md says how the file was made.
    #[test]
    fn store_written_before_the_record_type_still_opens() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ipam-store-v0.redb");
        // Opening writes (the table is created up front): work on a copy.
        let dir =
            std::env::temp_dir().join(format!("starling-store-fixture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("allocations.redb");
        std::fs::copy(&fixture, &path).expect("copy the fixture");
        let store = Store::open(&path).expect("the old store opens");
        let mut got = store.load().expect("the old store loads");
        // Old and new records live side by side once the node allocates again.
        store
            .commit(&[Change::Put(allocation())])
            .expect("a new record commits");
        let mut mixed = store.load().expect("old and new records load");
        // An old record is removed under the key it was stored by.
        let old = got
            .iter()
            .find(|a| a.key.container_id == "c2")
            .expect("c2 in the fixture")
            .key
            .clone();
        store
            .commit(&[Change::Remove(old.clone())])
            .expect("removing an old record commits");
        let left = store.load().expect("the store loads after the removal");
        assert_eq!(left.len(), mixed.len() - 1);
        assert!(left.iter().all(|a| a.key != old), "{left:?}");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        got.sort_by(|a, b| a.key.cmp(&b.key));
        mixed.sort_by(|a, b| a.key.cmp(&b.key));
        let expected: Vec<Allocation> = [
            r#"{"key":{"containerId":"4f1c0a9e3b7d2c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60","ifname":"eth0"},"ips":["10.244.1.2/32","fd00:10:244:1::2/128"],"hostVeth":"stl2abb2ae7204","netns":"/var/run/netns/cni-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"}"#,
            r#"{"key":{"containerId":"c2","ifname":"eth0"},"ips":["10.244.1.3/32"],"hostVeth":"stl3151d414b3f","netns":"/run/netns/pod-c2"}"#,
            r#"{"key":{"containerId":"c3","ifname":"net1"},"ips":["fd00:10:244:1::9/128"],"hostVeth":"stl071abff6c8c","netns":"/run/netns/pod-c3"}"#,
        ]
        .iter()
        .map(|j| serde_json::from_str(j).expect("literal"))
        .collect();
        assert_eq!(got, expected);
        let mut with_new = expected.clone();
        with_new.push(allocation());
        with_new.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(mixed, with_new);
    }

    fn allocation() -> Allocation {
        Allocation {
            key: AttachmentKey {
                network: "k8s-pod-network".into(),
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            ips: vec![
                "10.244.1.2/32".parse().unwrap(),
                "fd00::2/128".parse().unwrap(),
            ],
            host_veth: "stl0123456789a".into(),
            netns: "/run/netns/p".into(),
            allocated_unix_ms: 1_764_000_000_000,
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
            }),
        }
    }

    /// The bytes a record is stored as: a change here is a change of the
    /// on-disk format and needs a new version.
    #[test]
    fn record_format_is_fixed() {
        let body = serde_json::to_string(&Record::from(&allocation())).unwrap();
        assert_eq!(
            body,
            r#"{"version":2,"key":{"network":"k8s-pod-network","containerId":"c1","ifname":"eth0"},"ips":["10.244.1.2/32","fd00::2/128"],"hostVeth":"stl0123456789a","netns":"/run/netns/p","allocatedUnixMs":1764000000000,"pod":{"namespace":"default","name":"web-0"}}"#
        );
        assert_eq!(
            decode("k8s-pod-network/c1/eth0", body.as_bytes()).unwrap(),
            allocation()
        );
        // Without a pod (a runtime that is not Kubernetes) the field is absent.
        let mut bare = allocation();
        bare.pod = None;
        let body = serde_json::to_string(&Record::from(&bare)).unwrap();
        assert!(!body.contains(r#""pod""#), "{body}");
        assert_eq!(
            decode("k8s-pod-network/c1/eth0", body.as_bytes()).unwrap(),
            bare
        );
    }

    /// A version 1 record (no network, no time, no pod) still reads: as a
    /// record of no network, allocated at an unknown time, for no pod.
    #[test]
    fn a_version_1_record_reads_without_network_time_or_pod() {
        let body = r#"{"version":1,"key":{"containerId":"c1","ifname":"eth0"},"ips":["10.244.1.2/32"],"hostVeth":"stl0123456789a","netns":"/run/netns/p"}"#;
        let a = decode("c1/eth0", body.as_bytes()).unwrap();
        assert_eq!(a.key.network, "");
        assert_eq!(a.key.to_string(), "c1/eth0");
        assert_eq!(a.allocated_unix_ms, 0);
        assert_eq!(a.pod, None);
    }

    #[test]
    fn a_record_from_a_newer_agent_is_refused_by_name() {
        let body = r#"{"version":3,"key":{"containerId":"c1","ifname":"eth0"},"ips":[],"hostVeth":"x","netns":"y"}"#;
        let err = decode("c1/eth0", body.as_bytes()).unwrap_err();
        assert!(
            err.contains("c1/eth0") && err.contains("version 3"),
            "{err}"
        );
    }
}
