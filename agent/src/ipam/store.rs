//! The node's allocations, persisted in redb. A write transaction commits
//! (fsync) before the agent answers the plugin, so a reply always describes
//! durable state; redb's copy-on-write commit means a `kill -9` at any point
//! leaves either the old or the new set of allocations, never a mix.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use starling_cni::proto::{Allocation, AttachmentKey};
use std::path::{Path, PathBuf};

/// Attachment key (`containerID/ifname`: neither may contain `/`) to the
/// allocation as JSON.
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("allocations");

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
    format!("{}/{}", k.container_id, k.ifname)
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
            let alloc: Allocation = serde_json::from_slice(v.value())
                .map_err(|e| self.err(format!("entry {}: {e}", k.value())))?;
            out.push(alloc);
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
                        let body = serde_json::to_vec(a).map_err(|e| self.err(e))?;
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
