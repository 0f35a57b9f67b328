//! Order: put encoded items back in plan order. Items arrive out of order (several
//! connections, several compression threads); each holds budget until it is written, so the
//! window of items waiting here is bounded by the byte budget.

use super::{Encoded, ToSink};
use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;

/// The reorder window over the sink's input channel: iterating yields items in id order.
pub struct InOrder {
    input: Receiver<ToSink>,
    waiting: BTreeMap<u64, Encoded>,
    next: u64,
    /// The number of items of the plan, once the planner has handed them all out.
    total: Option<u64>,
}

impl InOrder {
    pub fn new(input: Receiver<ToSink>) -> InOrder {
        InOrder {
            input,
            waiting: BTreeMap::new(),
            next: 0,
            total: None,
        }
    }

    /// After the input closed: true when every item of the plan came out.
    pub fn complete(&self) -> bool {
        self.total == Some(self.next) && self.waiting.is_empty()
    }

    /// How many items came out, and how many the plan had (if the planner finished).
    pub fn progress(&self) -> (u64, Option<u64>) {
        (self.next, self.total)
    }
}

impl Iterator for InOrder {
    type Item = Encoded;

    fn next(&mut self) -> Option<Encoded> {
        loop {
            if let Some(item) = self.waiting.remove(&self.next) {
                self.next += 1;
                return Some(item);
            }
            if self.total == Some(self.next) {
                return None;
            }
            match self.input.recv().ok()? {
                ToSink::Encoded(e) => {
                    self.waiting.insert(e.id, e);
                }
                ToSink::Batch(items) => self.waiting.extend(items.into_iter().map(|e| (e.id, e))),
                ToSink::PlanDone { items } => self.total = Some(items),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64) -> Encoded {
        Encoded {
            id,
            records: Vec::new(),
            raw: None,
            permit: None,
        }
    }

    #[test]
    fn yields_in_order_and_knows_when_complete() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(ToSink::Encoded(item(2))).unwrap();
        tx.send(ToSink::Batch(vec![item(1), item(0)])).unwrap();
        tx.send(ToSink::PlanDone { items: 3 }).unwrap();
        let mut o = InOrder::new(rx);
        let ids: Vec<u64> = o.by_ref().map(|e| e.id).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(o.complete());
        drop(tx);
    }

    #[test]
    fn incomplete_without_the_plan_end_or_with_a_gap() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(ToSink::Encoded(item(0))).unwrap();
        drop(tx);
        let mut o = InOrder::new(rx);
        assert_eq!(o.by_ref().count(), 1);
        assert!(!o.complete());

        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(ToSink::Encoded(item(1))).unwrap();
        tx.send(ToSink::PlanDone { items: 2 }).unwrap();
        drop(tx);
        let mut o = InOrder::new(rx);
        assert_eq!(o.by_ref().count(), 0);
        assert!(!o.complete());
        assert_eq!(o.progress(), (0, Some(2)));
    }
}
