//! Where nodes claim blocks. Every write is a compare-and-swap, so two nodes
//! racing for one block end with one owner: the file flavour compares the
//! claim's revision under an exclusive lock on the file; the Kubernetes
//! flavour compares the claim object's `resourceVersion`, which is opaque:
//! only ever compared for equality, never parsed or ordered.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A node's claim on a block (Calico's block affinity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    pub block: IpNet,
    pub node: String,
    /// The datastore's version of the claim; a CAS names the revision it read.
    pub revision: Revision,
}

/// A claim's version as its datastore writes it, opaque to everyone else:
/// equal or not, nothing more. A Kubernetes `resourceVersion` must not be
/// parsed or ordered (the API conventions say so; etcd's numbers are an
/// implementation detail another storage need not share).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revision(pub String);

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// Someone else wrote first: re-read and decide again.
    #[error("block {block} is claimed by node {holder}")]
    Conflict { block: IpNet, holder: String },
    #[error("block {block} changed since it was read (revision {expected} expected)")]
    Stale { block: IpNet, expected: Revision },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a block claim file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The operations IPAM needs from a datastore. `Sync` because block claims
/// run on threads of their own, beside the IPAM thread that serves pods.
pub trait Datastore: Send + Sync {
    /// Every claim, by every node.
    fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError>;
    /// Claim `block` for `node` if nobody holds it (compare-and-swap on its
    /// absence). Claiming a block the node already holds returns that claim.
    fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError>;
    /// Drop a claim, only if it is still at the revision the caller read.
    fn release(&self, affinity: &Affinity) -> Result<(), DatastoreError>;
}

/// Claims kept in one JSON file that every agent sharing it locks with
/// `flock` while it reads, compares and atomically replaces it.
pub struct FileDatastore {
    path: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ClaimFile {
    #[serde(default)]
    affinities: Vec<FileClaim>,
}

/// One claim as the file stores it; the revision is this file's own
/// counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileClaim {
    block: IpNet,
    node: String,
    revision: u64,
}

impl From<&FileClaim> for Affinity {
    fn from(c: &FileClaim) -> Affinity {
        Affinity {
            block: c.block,
            node: c.node.clone(),
            revision: Revision(c.revision.to_string()),
        }
    }
}

impl FileDatastore {
    pub fn new(path: impl Into<PathBuf>) -> FileDatastore {
        FileDatastore { path: path.into() }
    }

    fn io(&self, source: std::io::Error) -> DatastoreError {
        DatastoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> Result<File, DatastoreError> {
        let lock_path = self.path.with_extension("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(e))?;
        // flock(2): released when `f` closes, also when the process dies.
        f.lock().map_err(|e| self.io(e))?;
        Ok(f)
    }

    fn read(&self) -> Result<ClaimFile, DatastoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) if bytes.is_empty() => Ok(ClaimFile::default()),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| DatastoreError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClaimFile::default()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Write-then-rename, with fsyncs, so a crash leaves the old or the new
    /// file and never a torn one.
    fn write(&self, file: &ClaimFile) -> Result<(), DatastoreError> {
        let tmp = self.path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(file).map_err(|e| DatastoreError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = File::create(&tmp).map_err(|e| self.io(e))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Datastore for FileDatastore {
    fn affinities(&self) -> Result<Vec<Affinity>, DatastoreError> {
        let _lock = self.lock()?;
        Ok(self.read()?.affinities.iter().map(Affinity::from).collect())
    }

    fn claim(&self, block: IpNet, node: &str) -> Result<Affinity, DatastoreError> {
        let _lock = self.lock()?;
        let mut file = self.read()?;
        if let Some(held) = file
            .affinities
            .iter()
            .find(|a| a.block.contains(&block.network()) || block.contains(&a.block.network()))
        {
            if held.block == block && held.node == node {
                return Ok(held.into());
            }
            return Err(DatastoreError::Conflict {
                block,
                holder: format!("{} (as {})", held.node, held.block),
            });
        }
        let claim = FileClaim {
            block,
            node: node.to_string(),
            revision: 1,
        };
        file.affinities.push(claim.clone());
        self.write(&file)?;
        Ok((&claim).into())
    }

    fn release(&self, affinity: &Affinity) -> Result<(), DatastoreError> {
        let _lock = self.lock()?;
        let mut file = self.read()?;
        let Some(pos) = file
            .affinities
            .iter()
            .position(|a| a.block == affinity.block)
        else {
            return Ok(());
        };
        if Affinity::from(&file.affinities[pos]) != *affinity {
            return Err(DatastoreError::Stale {
                block: affinity.block,
                expected: affinity.revision.clone(),
            });
        }
        file.affinities.remove(pos);
        self.write(&file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when the test ends.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmpfile(tag: &str) -> (Scratch, PathBuf) {
        let dir = std::env::temp_dir().join(format!("starling-ds-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("blocks.json");
        (Scratch(dir), file)
    }

    #[test]
    fn second_claimer_of_a_block_conflicts() {
        let (_scratch, path) = tmpfile("conflict");
        let a = FileDatastore::new(&path);
        let b = FileDatastore::new(&path);
        let block: IpNet = "10.0.0.0/26".parse().unwrap();
        let claim = a.claim(block, "n1").unwrap();
        assert_eq!(
            a.claim(block, "n1").unwrap(),
            claim,
            "idempotent for the holder"
        );
        assert!(matches!(
            b.claim(block, "n2"),
            Err(DatastoreError::Conflict { .. })
        ));
        // Overlapping blocks conflict too.
        assert!(b.claim("10.0.0.0/24".parse().unwrap(), "n2").is_err());
        a.release(&claim).unwrap();
        assert_eq!(b.claim(block, "n2").unwrap().node, "n2");
    }

    #[test]
    fn stale_release_is_refused() {
        let (_scratch, path) = tmpfile("stale");
        let ds = FileDatastore::new(&path);
        let block: IpNet = "10.0.0.0/26".parse().unwrap();
        let mut claim = ds.claim(block, "n1").unwrap();
        claim.revision = Revision("2".into());
        assert!(matches!(
            ds.release(&claim),
            Err(DatastoreError::Stale { .. })
        ));
    }

    #[test]
    fn concurrent_claims_have_one_winner() {
        let (_scratch, path) = tmpfile("race");
        let block: IpNet = "10.1.0.0/26".parse().unwrap();
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let p = path.clone();
                    s.spawn(move || FileDatastore::new(p).claim(block, &format!("n{i}")).is_ok())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(winners, 1);
    }
}
