//! A table of requests in flight, indexed by small integers that travel with their I/O as
//! tags: taking a slot reuses a freed one, so the table stays as large as the most requests
//! ever in flight at once, and no request allocates.

pub struct Slots<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    /// Stores `item`; returns its index.
    pub fn insert(&mut self, item: T) -> usize {
        match self.free.pop() {
            Some(index) => {
                self.items[index] = Some(item);
                index
            }
            None => {
                self.items.push(Some(item));
                self.items.len() - 1
            }
        }
    }

    /// Takes the item at `index` out, freeing the slot; None for a free or unknown index.
    pub fn remove(&mut self, index: usize) -> Option<T> {
        let item = self.items.get_mut(index)?.take()?;
        self.free.push(index);
        Some(item)
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.items.get_mut(index)?.as_mut()
    }

    /// The items stored, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter().flatten()
    }

    /// The items stored, in index order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items.iter_mut().flatten()
    }

    /// Items stored.
    pub fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_unknown_ones_refused() {
        let mut s = Slots::default();
        let (a, b) = (s.insert("a"), s.insert("b"));
        assert_eq!((a, b, s.len()), (0, 1, 2));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "freed twice");
        assert_eq!(s.remove(7), None);
        assert_eq!(s.insert("c"), a, "a freed slot is reused");
        assert_eq!(s.get_mut(b), Some(&mut "b"));
        assert_eq!(s.len(), 2);
    }
}
