//! The plan stage at run time: make the plan's items one by one and hand them out in order,
//! each once it has its share of the byte budget. Reads go to the fetch workers, ranges
//! known to be zero straight to the sink. For a full export through `base:allocation` the
//! planner keeps several BLOCK_STATUS requests in flight ahead of the reads, over the same
//! workers (so over every connection), and turns their answers into items in offset order.

use super::fetch::{FetchError, Job, StatusAnswer, Work};
use super::plan::{align_map, block_status_ranges, Items, Plan, PlanItem, Source};
use super::{Encoded, Record, ToSink};
use cbtstream_proto::cbt;
use cbtstream_proto::vhd::VhdAllocation;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

/// The least budget an item is charged, ZERO items included. Items wait in the reorder
/// window until the ones before them are written; charging each at least this much bounds
/// how many can wait there (a 32 MiB budget: 8192 items, about 1 MiB of bookkeeping).
pub const ITEM_COST: u64 = 4096;

/// How much of the disk one BLOCK_STATUS asks about: small enough that many are in flight
/// at once over all connections, large enough that a 16 TiB disk takes few requests.
pub const STATUS_CHUNK: u64 = 512 << 20;

pub struct Planner {
    pub jobs: async_channel::Sender<Job>,
    pub sink: std::sync::mpsc::Sender<ToSink>,
    pub budget: Arc<Semaphore>,
    /// BLOCK_STATUS requests in flight ahead of the reads.
    pub lookahead: usize,
}

/// The downstream stages are gone (they failed, and report why): stop planning.
struct Stopped;

impl Planner {
    /// Hand out every item of `plan`, then tell the sink how many there were.
    pub async fn run(self, plan: Plan) -> Result<(), FetchError> {
        let mut next_id = 0;
        let result = match &plan.source {
            Source::Bitmap(bitmap) => self.bitmap(&mut next_id, bitmap, &plan).await,
            Source::Full => self.full(&mut next_id, &plan).await,
            Source::Allocation { align } => self.allocation(&mut next_id, &plan, *align).await,
            Source::Allocated(alloc) => self.allocated(&mut next_id, alloc, &plan).await,
        };
        match result {
            Ok(Ok(())) => {
                let _ = self.sink.send(ToSink::PlanDone { items: next_id });
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(Stopped) => Ok(()),
        }
    }

    async fn bitmap(
        &self,
        next_id: &mut u64,
        bitmap: &[u8],
        plan: &Plan,
    ) -> Result<Result<(), FetchError>, Stopped> {
        // Validated when the plan was made.
        let Ok(extents) = cbt::extents(bitmap, plan.disk_size, plan.request) else {
            return Ok(Ok(()));
        };
        for e in extents {
            let item = PlanItem::Read {
                offset: e.offset,
                len: e.length,
            };
            self.dispatch(next_id, item).await?;
        }
        Ok(Ok(()))
    }

    async fn full(
        &self,
        next_id: &mut u64,
        plan: &Plan,
    ) -> Result<Result<(), FetchError>, Stopped> {
        let mut offset = 0;
        while offset < plan.disk_size {
            let len = plan.request.min(plan.disk_size - offset);
            self.dispatch(next_id, PlanItem::Read { offset, len })
                .await?;
            offset += len;
        }
        Ok(Ok(()))
    }

    /// Reads for the allocated ranges, ZERO items for the gaps, to the end of the disk.
    async fn allocated(
        &self,
        next_id: &mut u64,
        alloc: &VhdAllocation,
        plan: &Plan,
    ) -> Result<Result<(), FetchError>, Stopped> {
        let size = plan.disk_size;
        let mut items = Items::new(plan.request);
        let mut out = Vec::new();
        let mut pos = 0;
        for r in alloc.allocated_ranges() {
            let (start, end) = (r.start.min(size), r.end.min(size));
            items.push(pos, start - pos, true, &mut out);
            items.push(start, end - start, false, &mut out);
            pos = end;
            for item in out.drain(..) {
                self.dispatch(next_id, item).await?;
            }
        }
        items.push(pos, size - pos, true, &mut out);
        items.flush(&mut out);
        for item in out.drain(..) {
            self.dispatch(next_id, item).await?;
        }
        Ok(Ok(()))
    }

    async fn allocation(
        &self,
        next_id: &mut u64,
        plan: &Plan,
        align: u64,
    ) -> Result<Result<(), FetchError>, Stopped> {
        let size = plan.disk_size;
        let step = (STATUS_CHUNK / align).max(1) * align;
        let (tx, mut rx) = mpsc::unbounded_channel::<StatusAnswer>();
        // Asked, in offset order; and answers that came before the one at the front.
        let mut asked: VecDeque<(u64, u64)> = VecDeque::new();
        let mut answers: HashMap<u64, Result<Vec<_>, String>> = HashMap::new();
        let mut next_offset = 0;
        let mut items = Items::new(plan.request);
        let mut out = Vec::new();
        let mut warned = false;
        loop {
            while asked.len() < self.lookahead.max(1) && next_offset < size {
                let len = step.min(size - next_offset);
                self.ask(next_offset, len, &tx).await?;
                asked.push_back((next_offset, len));
                next_offset += len;
            }
            let Some((offset, len)) = asked.pop_front() else {
                break;
            };
            let extents = loop {
                if let Some(a) = answers.remove(&offset) {
                    break a;
                }
                // Never None: this task holds a sender.
                let Some(a) = rx.recv().await else {
                    return Err(Stopped);
                };
                answers.insert(a.offset, a.extents);
            };
            let ranges = match extents {
                Ok(extents) => {
                    let (map, covered) = block_status_ranges(offset, len, &extents);
                    if covered == 0 {
                        // Going on would skip the range, or ask about it forever.
                        return Ok(Err(FetchError::EmptyBlockStatus { offset, len }));
                    }
                    if covered < len {
                        // The server answered for the start only: ask about the rest next.
                        self.ask(offset + covered, len - covered, &tx).await?;
                        asked.push_front((offset + covered, len - covered));
                    }
                    align_map(&map, align)
                }
                // Block status only saves reads: without it, read the range.
                Err(why) => {
                    if !warned {
                        tracing::warn!("block status failed ({why}); reading those ranges");
                        warned = true;
                    }
                    vec![(offset, len, false)]
                }
            };
            for (o, l, zero) in ranges {
                items.push(o, l, zero, &mut out);
            }
            for item in out.drain(..) {
                self.dispatch(next_id, item).await?;
            }
        }
        items.flush(&mut out);
        for item in out.drain(..) {
            self.dispatch(next_id, item).await?;
        }
        Ok(Ok(()))
    }

    async fn ask(
        &self,
        offset: u64,
        len: u64,
        answer: &mpsc::UnboundedSender<StatusAnswer>,
    ) -> Result<(), Stopped> {
        let job = Job {
            id: 0,
            offset,
            len,
            attempts: 0,
            work: Work::Status(answer.clone()),
        };
        self.jobs.send(job).await.map_err(|_| Stopped)
    }

    /// Hand out one item once the budget has room for it.
    async fn dispatch(&self, next_id: &mut u64, item: PlanItem) -> Result<(), Stopped> {
        let id = *next_id;
        *next_id += 1;
        let len = match item {
            PlanItem::Read { len, .. } | PlanItem::Zero { len, .. } => len,
        };
        let cost = match item {
            PlanItem::Read { .. } => len.max(ITEM_COST),
            PlanItem::Zero { .. } => ITEM_COST,
        };
        // The budget is at least the largest read (see `run`), so this fits in u32.
        let cost = u32::try_from(cost).map_err(|_| Stopped)?;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| Stopped)?;
        match item {
            PlanItem::Read { offset, len } => {
                let job = Job {
                    id,
                    offset,
                    len,
                    attempts: 0,
                    work: Work::Read(Some(permit)),
                };
                self.jobs.send(job).await.map_err(|_| Stopped)
            }
            PlanItem::Zero { offset, len } => {
                let e = Encoded {
                    id,
                    records: vec![Record::Zero { offset, len }],
                    raw: None,
                    permit: Some(permit),
                };
                self.sink.send(ToSink::Encoded(e)).map_err(|_| Stopped)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbtstream_proto::cbt::CBT_BLOCK;
    use cbtstream_proto::nbd::consts::{STATE_HOLE, STATE_ZERO};
    use cbtstream_proto::nbd::BlockStatusExtent;

    const MIB: u64 = 1 << 20;

    struct Harness {
        jobs: async_channel::Receiver<Job>,
        sink: std::sync::mpsc::Receiver<ToSink>,
        task: tokio::task::JoinHandle<Result<(), FetchError>>,
    }

    fn start(plan: Plan, budget: u64) -> Harness {
        let (job_tx, jobs) = async_channel::bounded(256);
        let (sink_tx, sink) = std::sync::mpsc::channel();
        let planner = Planner {
            jobs: job_tx,
            sink: sink_tx,
            budget: Arc::new(Semaphore::new(budget as usize)),
            lookahead: 2,
        };
        Harness {
            jobs,
            sink,
            task: tokio::spawn(planner.run(plan)),
        }
    }

    fn ext(length: u64, zero: bool) -> BlockStatusExtent {
        let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
        BlockStatusExtent {
            length,
            flags: u64::from(flags),
        }
    }

    /// Answer block-status jobs with `answer(offset, len)` and collect the items handed out
    /// (reads from the job queue, zeroes from the sink channel), in id order.
    async fn drive(
        h: Harness,
        answer: impl Fn(u64, u64) -> Vec<BlockStatusExtent>,
    ) -> (
        Result<(), FetchError>,
        Vec<PlanItem>,
        Option<u64>,
        Vec<(u64, u64)>,
    ) {
        let mut items = Vec::new();
        let mut asked = Vec::new();
        while let Ok(job) = h.jobs.recv().await {
            match job.work {
                Work::Status(tx) => {
                    asked.push((job.offset, job.len));
                    let extents = Ok(answer(job.offset, job.len));
                    let _ = tx.send(StatusAnswer {
                        offset: job.offset,
                        extents,
                    });
                }
                Work::Read(_) => items.push((
                    job.id,
                    PlanItem::Read {
                        offset: job.offset,
                        len: job.len,
                    },
                )),
            }
        }
        let result = h.task.await.unwrap();
        let mut done = None;
        for msg in h.sink.try_iter() {
            match msg {
                ToSink::Encoded(e) => {
                    for r in e.records {
                        if let Record::Zero { offset, len } = r {
                            items.push((e.id, PlanItem::Zero { offset, len }));
                        }
                    }
                }
                ToSink::PlanDone { items } => done = Some(items),
                ToSink::Batch(_) => {}
            }
        }
        items.sort_by_key(|i| i.0);
        (
            result,
            items.into_iter().map(|i| i.1).collect(),
            done,
            asked,
        )
    }

    #[tokio::test]
    async fn allocation_plan_follows_block_status() {
        // 3 GiB disk: status chunks of 512 MiB. Data in the first 64 KiB of each chunk.
        let plan = Plan::allocation(3 << 30, MIB, 512).unwrap();
        let h = start(plan, 64 * MIB);
        let (result, items, done, asked) = drive(h, |_, len| {
            vec![ext(CBT_BLOCK, false), ext(len - CBT_BLOCK, true)]
        })
        .await;
        result.unwrap();
        assert_eq!(asked.len(), 6);
        assert_eq!(items.len(), 12);
        assert_eq!(done, Some(12));
        assert_eq!(
            items[..2],
            [
                PlanItem::Read {
                    offset: 0,
                    len: CBT_BLOCK
                },
                PlanItem::Zero {
                    offset: CBT_BLOCK,
                    len: STATUS_CHUNK - CBT_BLOCK
                }
            ]
        );
    }

    #[tokio::test]
    async fn a_short_answer_asks_for_the_rest() {
        let plan = Plan::allocation(4 * MIB, MIB, 512).unwrap();
        let h = start(plan, 64 * MIB);
        // Each answer covers at most 1 MiB, all data.
        let (result, items, done, asked) = drive(h, |_, len| vec![ext(len.min(MIB), false)]).await;
        result.unwrap();
        assert_eq!(
            asked,
            vec![
                (0, 4 * MIB),
                (MIB, 3 * MIB),
                (2 * MIB, 2 * MIB),
                (3 * MIB, MIB)
            ]
        );
        assert_eq!(items.len(), 4);
        assert_eq!(done, Some(4));
    }

    #[tokio::test]
    async fn an_answer_covering_nothing_is_an_error() {
        let plan = Plan::allocation(4 * MIB, MIB, 512).unwrap();
        let h = start(plan, 64 * MIB);
        let (result, items, done, _) = drive(h, |_, _| Vec::new()).await;
        let e = result.unwrap_err();
        assert!(
            matches!(e, FetchError::EmptyBlockStatus { offset: 0, .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "the server's block status for 4194304 bytes at offset 0 covers no bytes"
        );
        assert!(items.is_empty());
        // The sink is not told the plan is complete: it will refuse to finish the stream.
        assert_eq!(done, None);
    }

    /// Poll `fut` once: true when it completed.
    async fn ready_now<F: std::future::Future>(fut: F) -> bool {
        tokio::select! {
            biased;
            _ = fut => true,
            _ = std::future::ready(()) => false,
        }
    }

    #[tokio::test]
    async fn zero_items_are_charged_against_the_budget() {
        let (job_tx, _jobs) = async_channel::bounded(256);
        let (sink_tx, sink) = std::sync::mpsc::channel();
        let budget = Arc::new(Semaphore::new(2 * ITEM_COST as usize));
        let planner = Planner {
            jobs: job_tx,
            sink: sink_tx,
            budget: budget.clone(),
            lookahead: 1,
        };
        let mut id = 0;
        let zero = |n: u64| PlanItem::Zero {
            offset: n * CBT_BLOCK,
            len: CBT_BLOCK,
        };
        assert!(ready_now(planner.dispatch(&mut id, zero(0))).await);
        assert!(ready_now(planner.dispatch(&mut id, zero(1))).await);
        // The budget is spent: the third waits until the sink writes one.
        assert!(!ready_now(planner.dispatch(&mut id, zero(2))).await);
        let first = sink.try_recv().unwrap();
        drop(first);
        assert!(ready_now(planner.dispatch(&mut id, zero(3))).await);
        assert_eq!(budget.available_permits(), 0);
    }

    #[tokio::test]
    async fn bitmap_and_full_plans_hand_out_reads_in_order() {
        let plan = Plan::from_bitmap(vec![0b1011_0000], 8 * CBT_BLOCK, CBT_BLOCK * 2).unwrap();
        let (result, items, done, _) = drive(start(plan, 64 * MIB), |_, _| Vec::new()).await;
        result.unwrap();
        assert_eq!(
            items,
            vec![
                PlanItem::Read {
                    offset: 0,
                    len: CBT_BLOCK
                },
                PlanItem::Read {
                    offset: 2 * CBT_BLOCK,
                    len: 2 * CBT_BLOCK
                }
            ]
        );
        assert_eq!(done, Some(2));
        let plan = Plan::full(3 * MIB + 512, MIB).unwrap();
        let (result, items, done, _) = drive(start(plan, 64 * MIB), |_, _| Vec::new()).await;
        result.unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(done, Some(4));
    }
}
