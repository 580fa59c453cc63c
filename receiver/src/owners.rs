//! What each server's stored blocks take (the catalog's `server_blocks`
//! joined with `blocks`): the committed part of a server's quota usage,
//! kept in memory per server (a number each, not a set of blocks).
//!
//! Which server has stored which block (the scope of deduplication) is
//! looked up in the catalog through the store's block index
//! ([`crate::catalog::BlockIndex::owns`]). The usage is loaded once when the
//! store opens to serve, grows by what each commit charges (the stored
//! bytes of the blocks its server had not stored, counted by the commit's
//! own transaction), and is loaded again by garbage collection after it
//! dropped the rows of blocks a server no longer references.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::catalog::Catalog;
use crate::ReceiveError;

/// The stored bytes each server is charged for.
#[derive(Debug, Default)]
pub struct Owners {
    used: Mutex<HashMap<i64, u64>>,
}

impl Owners {
    /// Load from the catalog (one pass over `server_blocks`).
    pub fn load(cat: &Catalog) -> Result<Self, ReceiveError> {
        Ok(Self {
            used: Mutex::new(cat.usage_by_server()?),
        })
    }

    /// Load again from the catalog.
    pub fn reload(&self, cat: &Catalog) -> Result<(), ReceiveError> {
        let fresh = cat.usage_by_server()?;
        *self.lock()? = fresh;
        Ok(())
    }

    /// Stored bytes of the blocks `server` has stored.
    pub fn used(&self, server: i64) -> u64 {
        self.used
            .lock()
            .ok()
            .and_then(|u| u.get(&server).copied())
            .unwrap_or(0)
    }

    /// A commit of `server` charged it `bytes` more.
    pub fn charge(&self, server: i64, bytes: u64) -> Result<(), ReceiveError> {
        let mut u = self.lock()?;
        let e = u.entry(server).or_insert(0);
        *e = e.saturating_add(bytes);
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<i64, u64>>, ReceiveError> {
        self.used
            .lock()
            .map_err(|_| ReceiveError::poisoned("owners"))
    }
}
