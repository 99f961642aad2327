use crate::error::Result;
use crate::wire::{call, Request};

/// A command queue. Requests on one queue run in submission order; requests on different
/// queues (and of other inferlets) are batched together, so contexts that should advance in
/// the same tick live on different queues. Queue 0 exists from the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Queue {
    id: u32,
}

impl Queue {
    /// The queue every instance starts with.
    pub const DEFAULT: Queue = Queue { id: 0 };

    /// A new queue; higher `priority` runs first when a batch is full.
    pub fn create(priority: i32) -> Result<Queue> {
        let id = call(&Request::new("create_queue").with("priority", &priority))?;
        Ok(Queue { id })
    }

    /// The queue's virtual id, as the ops take it.
    pub fn id(self) -> u32 {
        self.id
    }

    pub fn set_priority(self, priority: i32) -> Result<()> {
        call(&Request::new("set_priority").with("queue", &self.id).with("priority", &priority))
    }

    /// Block until every earlier request on this queue has completed.
    pub fn synchronize(self) -> Result<()> {
        call(&Request::new("synchronize").with("queue", &self.id))
    }
}
