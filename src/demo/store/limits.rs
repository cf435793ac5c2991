//! What the store may hold, in all and per client, and what it holds now.

/// Limits of the in-memory store: it serves untrusted clients too.
///
/// The store-wide limits bound what all clients together may make the server hold; the
/// per-client ones (for `Store` capabilities made by [`Store::client_for`]) keep one client
/// from taking all of it, so that filling its share leaves the others room.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Longest key, in bytes. Default 1 KiB.
    pub max_key_bytes: usize,
    /// Largest value, in bytes. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Most keys across all namespaces. Default 100,000.
    pub max_entries: usize,
    /// Most namespaces (nested ones included). Default 10,000.
    pub max_namespaces: usize,
    /// Most bytes the store holds, all namespaces together: every key costs its length, its
    /// value's length and [`ENTRY_OVERHEAD_BYTES`]; every namespace its name's length and
    /// [`NAMESPACE_OVERHEAD_BYTES`]. Default 256 MiB: the counts alone allow 100,000 values
    /// of 1 MiB, which is 100 GB of memory for any client that asks.
    pub max_bytes: usize,
    /// Most keys one client's writes may hold (a key is charged to the client that last wrote
    /// it). Default 10,000: a tenth of `max_entries`, so one client cannot take them all.
    pub max_entries_per_client: usize,
    /// Most namespaces one client may have created. Default 1,000: a tenth of
    /// `max_namespaces`; without it one client created all 10,000 in 5 s and every other
    /// client got `Overloaded` for new namespaces from then on.
    pub max_namespaces_per_client: usize,
    /// Most bytes (counted as for `max_bytes`) charged to one client: its keys and the
    /// namespaces it created. Default 16 MiB: a sixteenth of `max_bytes`.
    pub max_bytes_per_client: usize,
    /// Longest namespace name, in bytes. Default 256.
    pub max_name_bytes: usize,
    /// Most watchers on one namespace. Default 1,024.
    pub max_watchers_per_namespace: usize,
    /// Changes queued for one slow watcher before it is dropped. Default 256.
    pub max_pending_changes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            max_entries: 100_000,
            max_namespaces: 10_000,
            max_bytes: 256 << 20,
            max_entries_per_client: 10_000,
            max_namespaces_per_client: 1_000,
            max_bytes_per_client: 16 << 20,
            max_name_bytes: 256,
            max_watchers_per_namespace: 1024,
            max_pending_changes: 256,
        }
    }
}

/// Capabilities of the store currently alive on the server (not yet released by clients).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveObjects {
    /// `Store` capabilities.
    pub stores: usize,
    /// `Namespace` capabilities.
    pub namespaces: usize,
    /// `Reader` capabilities.
    pub readers: usize,
    /// `Subscription` capabilities.
    pub subscriptions: usize,
    /// Client `Watcher` capabilities the server holds.
    pub watchers: usize,
}

/// What the store holds (or one client is charged for), as counted against its limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Namespaces (nested ones included).
    pub namespaces: usize,
    /// Keys, all namespaces together.
    pub entries: usize,
    /// Bytes counted against [`StoreLimits::max_bytes`].
    pub bytes: usize,
}

impl StoreUsage {
    pub(super) fn plus(self, o: Self) -> Self {
        Self {
            namespaces: self.namespaces + o.namespaces,
            entries: self.entries + o.entries,
            bytes: self.bytes.saturating_add(o.bytes),
        }
    }

    /// `self` less `o`, which it includes.
    pub(super) fn minus(self, o: Self) -> Self {
        debug_assert!(
            self.namespaces >= o.namespaces && self.entries >= o.entries && self.bytes >= o.bytes,
            "{self:?} does not include {o:?}"
        );
        Self {
            namespaces: self.namespaces.saturating_sub(o.namespaces),
            entries: self.entries.saturating_sub(o.entries),
            bytes: self.bytes.saturating_sub(o.bytes),
        }
    }
}

/// Bookkeeping charged for each key on top of its key and value bytes (its map entry, the
/// two allocations), so that many empty keys are not free. Measured (x86-64, glibc): about
/// 170 bytes.
pub const ENTRY_OVERHEAD_BYTES: usize = 176;

/// Bookkeeping charged for each namespace on top of its name (its record, its entry in the
/// index, its change notifier), so that many short-named namespaces are not free. Measured
/// (x86-64, glibc): about 275 bytes.
pub const NAMESPACE_OVERHEAD_BYTES: usize = 288;
