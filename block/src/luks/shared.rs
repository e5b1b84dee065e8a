//! One detached LUKS header shared by several `luks` nodes: parsed and
//! unlocked once, the volume key and the payload cipher held once.
//!
//! The block graph keeps a [`SharedHeaders`] registry keyed by the header
//! node's node-name (and checked against the node itself, so that a header
//! node removed and added again under the same name is not mistaken for the
//! old one). The registry holds weak references only: the [`Unlocked`] volume
//! lives as long as a luks node uses it ([`HeaderUse`]), and its key is
//! zeroized when the last one is dropped (`blockdev-del` of the last disk).
//!
//! Secrets: a luks node naming a header that is already unlocked reuses the
//! unlock only when its `key-secret` has the same id *and* the same bytes as
//! a secret that already unlocked it (compared through a salted SHA-256 tag,
//! so no passphrase is kept). Any other secret runs its own key derivation
//! (the passphrase check is the KDF), and must yield the very volume key
//! held, or the node fails with QEMU's "Invalid password, cannot unlock any
//! keyslot".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use sha2::{Digest, Sha256};

use super::cipher::SectorCipher;
use super::error::{random_bytes, LuksError};
use super::keyslot::MasterKey;
use super::luks2::Luks2Header;
use super::LuksHeader;
use crate::node::NodeRef;

/// The parsed header of either version.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Meta {
    /// LUKS1.
    V1(LuksHeader),
    /// LUKS2.
    V2(Box<Luks2Header>),
}

/// A salted digest of (secret id, passphrase) that unlocked a volume.
type SecretTag = [u8; 32];

/// A header node's unlocked volume: the parsed header, the volume key, the
/// payload cipher built from it, the secrets that opened it and the luks
/// nodes that use it.
pub(crate) struct Unlocked {
    header_node: NodeRef,
    header_name: String,
    pub(crate) meta: Arc<Meta>,
    /// Zeroized when the last user is dropped.
    key: MasterKey,
    pub(crate) cipher: Arc<dyn SectorCipher>,
    salt: [u8; 32],
    secrets: Mutex<Vec<SecretTag>>,
    /// Node-names of the luks nodes using the header, in the order they came.
    users: Mutex<Vec<String>>,
}

/// Locks `m`; a poisoned lock still holds a usable list of names.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Equality of byte strings in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Unlocked {
    fn tag(&self, secret_id: &str, passphrase: &[u8]) -> SecretTag {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update((secret_id.len() as u64).to_le_bytes());
        h.update(secret_id.as_bytes());
        h.update(passphrase);
        h.finalize().into()
    }

    /// Whether secret `secret_id` with these bytes already unlocked the volume.
    pub(crate) fn knows_secret(&self, secret_id: &str, passphrase: &[u8]) -> bool {
        let tag = self.tag(secret_id, passphrase);
        lock(&self.secrets).iter().any(|t| ct_eq(t, &tag))
    }

    /// Accepts `key`, derived by another secret, if it is the volume key held
    /// (else QEMU's wrong-passphrase error), and remembers the secret.
    pub(crate) fn accept(
        &self,
        secret_id: &str,
        passphrase: &[u8],
        key: &MasterKey,
    ) -> Result<(), LuksError> {
        if !ct_eq(key, &self.key) {
            return Err(LuksError::WrongPassphrase);
        }
        let tag = self.tag(secret_id, passphrase);
        lock(&self.secrets).push(tag);
        Ok(())
    }

    /// The luks nodes using the header.
    pub(crate) fn users(&self) -> Vec<String> {
        lock(&self.users).clone()
    }

    /// Refuses a write to the header while more than one luks node uses it.
    pub(crate) fn check_exclusive(&self) -> Result<(), LuksError> {
        let users = self.users();
        if users.len() > 1 {
            return Err(LuksError::HeaderShared {
                header: self.header_name.clone(),
                users,
            });
        }
        Ok(())
    }
}

/// Where a luks node being opened finds the header's shared unlock: the
/// graph's registry, the header node's name and the luks node's own name.
#[derive(Clone)]
pub struct HeaderSlot {
    /// The graph's registry.
    pub registry: Arc<SharedHeaders>,
    /// The node-name of the header node.
    pub header: String,
    /// The node-name of the luks node.
    pub user: String,
}

/// The unlocked detached headers of a block graph, by header node-name.
#[derive(Default)]
pub struct SharedHeaders {
    by_header: Mutex<BTreeMap<String, Weak<Unlocked>>>,
}

impl SharedHeaders {
    /// The live unlock of header `name`, if it is still that `node`.
    pub(crate) fn lookup(&self, name: &str, node: &NodeRef) -> Option<Arc<Unlocked>> {
        let mut map = lock(&self.by_header);
        map.retain(|_, w| w.strong_count() > 0);
        map.get(name)
            .and_then(Weak::upgrade)
            .filter(|u| Arc::ptr_eq(&u.header_node, node))
    }

    /// Registers a fresh unlock of header `name` (`node`). Should another
    /// open have registered one meanwhile, that one is kept and returned if
    /// `key` is its key.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert(
        &self,
        name: &str,
        node: NodeRef,
        meta: Arc<Meta>,
        key: MasterKey,
        cipher: Arc<dyn SectorCipher>,
        secret_id: &str,
        passphrase: &[u8],
    ) -> Result<Arc<Unlocked>, LuksError> {
        let mut salt = [0u8; 32];
        random_bytes(&mut salt)?;
        let mut map = lock(&self.by_header);
        if let Some(old) = map
            .get(name)
            .and_then(Weak::upgrade)
            .filter(|u| Arc::ptr_eq(&u.header_node, &node))
        {
            old.accept(secret_id, passphrase, &key)?;
            return Ok(old);
        }
        let unlocked = Arc::new(Unlocked {
            header_node: node,
            header_name: name.to_string(),
            meta,
            key,
            cipher,
            salt,
            secrets: Mutex::new(Vec::new()),
            users: Mutex::new(Vec::new()),
        });
        let tag = unlocked.tag(secret_id, passphrase);
        lock(&unlocked.secrets).push(tag);
        map.insert(name.to_string(), Arc::downgrade(&unlocked));
        Ok(unlocked)
    }

    /// The luks nodes using header `name` (none when it is not unlocked).
    pub fn users(&self, name: &str) -> Vec<String> {
        lock(&self.by_header)
            .get(name)
            .and_then(Weak::upgrade)
            .map(|u| u.users())
            .unwrap_or_default()
    }

    /// Refuses a write to header `name` (amend, a resize that rewrites it)
    /// while more than one luks node uses it ([`LuksError::HeaderShared`]).
    pub fn check_writable(&self, name: &str) -> Result<(), LuksError> {
        let unlocked = lock(&self.by_header).get(name).and_then(Weak::upgrade);
        match unlocked {
            Some(u) => u.check_exclusive(),
            None => Ok(()),
        }
    }

    /// How many unlocked headers are alive (their keys not yet zeroized).
    pub fn live(&self) -> usize {
        lock(&self.by_header)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// A luks node's use of a shared header: counted among its users until dropped.
pub(crate) struct HeaderUse {
    pub(crate) unlocked: Arc<Unlocked>,
    user: String,
}

impl HeaderUse {
    /// Records `user` as a user of `unlocked`.
    pub(crate) fn new(unlocked: Arc<Unlocked>, user: &str) -> Self {
        lock(&unlocked.users).push(user.to_string());
        HeaderUse {
            unlocked,
            user: user.to_string(),
        }
    }
}

impl Drop for HeaderUse {
    fn drop(&mut self) {
        let mut users = lock(&self.unlocked.users);
        if let Some(i) = users.iter().position(|u| *u == self.user) {
            users.remove(i);
        }
    }
}
