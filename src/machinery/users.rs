//! Values shared by the users (connections) that need the same one, kept only while some
//! user needs them: each user uses one key at a time, and a key goes with its last user.
//! A rotated Secret or a deleted connection then leaves nothing behind.

use std::collections::HashMap;
use std::hash::Hash;

/// Which key each user uses, and how many users each key has.
pub struct Users<User, Key> {
    key_of: HashMap<User, Key>,
    users_of: HashMap<Key, usize>,
}

impl<User, Key> Default for Users<User, Key> {
    fn default() -> Self {
        Users {
            key_of: HashMap::new(),
            users_of: HashMap::new(),
        }
    }
}

impl<User: Hash + Eq, Key: Hash + Eq + Clone> Users<User, Key> {
    /// `user` now uses `key`. Returns the key it used before when nobody uses that any
    /// more: the caller drops what it keeps under it.
    #[must_use = "a key without users must be dropped by the caller"]
    pub fn use_key(&mut self, user: User, key: Key) -> Option<Key> {
        let previous = self.key_of.insert(user, key.clone());
        if previous.as_ref() == Some(&key) {
            return None;
        }
        *self.users_of.entry(key).or_default() += 1;
        previous.and_then(|previous| self.release(previous))
    }

    /// Forgets `user`. Returns its key when nobody else uses it.
    #[must_use = "a key without users must be dropped by the caller"]
    pub fn forget(&mut self, user: &User) -> Option<Key> {
        let key = self.key_of.remove(user)?;
        self.release(key)
    }

    /// How many users use `key`.
    pub fn users_of(&self, key: &Key) -> usize {
        self.users_of.get(key).copied().unwrap_or_default()
    }

    fn release(&mut self, key: Key) -> Option<Key> {
        let users = self.users_of.get_mut(&key)?;
        *users = users.saturating_sub(1);
        if *users > 0 {
            return None;
        }
        self.users_of.remove(&key);
        Some(key)
    }
}

/// One value per key, made once for all its users (the HTTP client of each TLS trust
/// configuration), dropped with its last user.
pub struct SharedByUsers<User, Key, Value> {
    users: Users<User, Key>,
    values: HashMap<Key, Value>,
}

impl<User, Key, Value> Default for SharedByUsers<User, Key, Value> {
    fn default() -> Self {
        SharedByUsers {
            users: Users::default(),
            values: HashMap::new(),
        }
    }
}

impl<User: Hash + Eq, Key: Hash + Eq + Clone, Value: Clone> SharedByUsers<User, Key, Value> {
    /// The value for `key`, made with `make` unless another user already has it. What `user`
    /// used before is dropped when nobody else uses it. A failure to make keeps what the
    /// user had.
    pub fn get_or_make<E>(&mut self, user: User, key: &Key, make: impl FnOnce() -> Result<Value, E>) -> Result<Value, E> {
        let value = match self.values.get(key) {
            Some(value) => value.clone(),
            None => {
                let value = make()?;
                self.values.insert(key.clone(), value.clone());
                value
            }
        };
        if let Some(unused) = self.users.use_key(user, key.clone()) {
            self.values.remove(&unused);
        }
        Ok(value)
    }

    /// Forgets `user`, and its value when nobody else uses it.
    pub fn forget(&mut self, user: &User) {
        if let Some(unused) = self.users.forget(user) {
            self.values.remove(&unused);
        }
    }

    /// The number of values kept.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_goes_with_its_last_user() {
        let mut users = Users::default();
        // (user, key it now uses, the key that lost its last user)
        let steps = [
            ("a", "k1", None),
            ("b", "k1", None),
            ("a", "k1", None),
            ("a", "k2", None),
            ("b", "k2", Some("k1")),
            ("c", "k3", None),
            ("c", "k2", Some("k3")),
        ];
        for (index, (user, key, unused)) in steps.into_iter().enumerate() {
            assert_eq!(users.use_key(user, key), unused, "step {index}");
        }
        assert_eq!(users.users_of(&"k2"), 3);
        assert_eq!((users.forget(&"a"), users.forget(&"b")), (None, None));
        assert_eq!(users.forget(&"c"), Some("k2"));
        assert_eq!(users.forget(&"never-seen"), None);
        assert_eq!(users.users_of(&"k2"), 0);
    }

    fn make(value: &'static str) -> impl FnOnce() -> Result<&'static str, ()> {
        move || Ok(value)
    }

    #[test]
    fn users_of_the_same_key_share_one_value() {
        let mut cache = SharedByUsers::default();
        assert_eq!(cache.get_or_make("a", &"default", make("client-1")), Ok("client-1"));
        assert_eq!(cache.get_or_make("b", &"default", make("client-2")), Ok("client-1"));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_value_goes_when_its_last_user_goes() {
        let mut cache = SharedByUsers::default();
        cache.get_or_make("a", &"ca-1", make("client-1")).unwrap();
        cache.get_or_make("b", &"ca-1", make("client-1")).unwrap();
        cache.forget(&"a");
        assert_eq!(cache.len(), 1, "b still uses it");
        cache.forget(&"b");
        assert_eq!(cache.len(), 0);
        cache.forget(&"never-seen");
    }

    #[test]
    fn a_user_that_moves_to_another_key_releases_the_old_one() {
        let mut cache = SharedByUsers::default();
        for rotation in 0..100 {
            let bundle = format!("ca-{rotation}");
            cache.get_or_make("a", &bundle, || Ok::<_, ()>(rotation)).unwrap();
        }
        assert_eq!(cache.len(), 1, "rotated CA bundles must not pile up");
        assert_eq!(cache.get_or_make("a", &"ca-99".to_owned(), || Ok::<_, ()>(-1)), Ok(99));
    }

    #[test]
    fn a_failure_to_make_keeps_what_the_user_had() {
        let mut cache = SharedByUsers::default();
        cache.get_or_make("a", &"good", make("client")).unwrap();
        assert_eq!(cache.get_or_make("a", &"bad", || Err("invalid PEM")), Err("invalid PEM"));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get_or_make("b", &"good", make("other")), Ok("client"));
    }
}
