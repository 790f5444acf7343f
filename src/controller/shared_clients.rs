//! Values shared by the connections that need the same one, kept only while some
//! connection uses them: the HTTP client of each TLS trust configuration. A rotated CA
//! bundle or a deleted connection then leaves no client behind.

use std::collections::HashMap;
use std::hash::Hash;

pub struct SharedByUsers<User, Key, Value> {
    /// What each user last asked for.
    key_of: HashMap<User, Key>,
    values: HashMap<Key, Value>,
}

impl<User, Key, Value> Default for SharedByUsers<User, Key, Value> {
    fn default() -> Self {
        SharedByUsers {
            key_of: HashMap::new(),
            values: HashMap::new(),
        }
    }
}

impl<User: Hash + Eq, Key: Hash + Eq + Clone, Value: Clone> SharedByUsers<User, Key, Value> {
    /// The value for `key`, made with `make` unless another user already has it. What `user`
    /// used before is dropped when nobody else uses it.
    pub fn get_or_make<E>(&mut self, user: User, key: &Key, make: impl FnOnce() -> Result<Value, E>) -> Result<Value, E> {
        let value = match self.values.get(key) {
            Some(value) => value.clone(),
            None => {
                let value = make()?;
                self.values.insert(key.clone(), value.clone());
                value
            }
        };
        if let Some(previous) = self.key_of.insert(user, key.clone())
            && previous != *key
        {
            self.drop_if_unused(&previous);
        }
        Ok(value)
    }

    /// Forgets `user`, and its value when nobody else uses it.
    pub fn forget(&mut self, user: &User) {
        if let Some(key) = self.key_of.remove(user) {
            self.drop_if_unused(&key);
        }
    }

    /// The number of values kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.values.len()
    }

    fn drop_if_unused(&mut self, key: &Key) {
        if !self.key_of.values().any(|used| used == key) {
            self.values.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
