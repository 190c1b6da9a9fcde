//! The money-transfer saga and the balance read model of the bank example.
//!
//! Shared by `examples/bank/main.rs` and `tests/sagas.rs`.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use annals::{
    CommandMetadata, Repository, Upcasters,
    consumers::{HandlerError, Projection, Saga, SagaPlan, SagaStep, StepError},
};
use annals_core::{EventData, ExpectedVersion, Filter, RecordedEvent, Store, StreamName, async_trait};
use serde::{Deserialize, Serialize};

use crate::domain::{Account, AccountCommand, AccountEvent, Cents};

/// Event type that starts a transfer saga (stream `transfer-{id}`).
pub const TRANSFER_REQUESTED: &str = "TransferRequested";
/// Event type that approves a large transfer.
pub const TRANSFER_APPROVED: &str = "TransferApproved";

/// The request that starts a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRequested {
    /// Unique transfer id.
    pub transfer_id: String,
    /// Account debited.
    pub from: String,
    /// Account credited.
    pub to: String,
    /// How much.
    pub amount: Cents,
    /// Whether someone must approve it (within the saga's timeout) before
    /// the money is credited.
    pub needs_approval: bool,
}

/// Records a transfer request; the saga takes it from there.
pub async fn request_transfer(store: &dyn Store, request: &TransferRequested) -> annals_core::Result<()> {
    let stream = StreamName::new(format!("transfer-{}", request.transfer_id))?;
    let event = EventData::json(TRANSFER_REQUESTED, request)?;
    store.append(&stream, ExpectedVersion::NoStream, vec![event]).await.map(|_| ())
}

/// Approves a transfer that waits for approval.
pub async fn approve_transfer(store: &dyn Store, transfer_id: &str) -> annals_core::Result<()> {
    let stream = StreamName::new(format!("transfer-{transfer_id}"))?;
    let event = EventData::json(TRANSFER_APPROVED, &serde_json::json!({ "transfer_id": transfer_id }))?;
    store.append(&stream, ExpectedVersion::StreamExists, vec![event]).await.map(|_| ())
}

/// The saga's steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TransferStep {
    /// Take the money out of `account`; undone by a refund.
    Debit { account: String, to: String, amount: Cents, transfer_id: String },
    /// Wait for a `TransferApproved` event.
    AwaitApproval,
    /// Put the money into `account`.
    Credit { account: String, from: String, amount: Cents, transfer_id: String },
}

/// Debit A, (maybe wait for approval,) credit B; when a step fails (B is
/// closed, approval timed out), refund A.
pub struct TransferSaga {
    /// The accounts.
    pub repo: Repository<Account>,
    /// How long a transfer waits for approval.
    pub approval_timeout: Duration,
}

#[async_trait]
impl Saga for TransferSaga {
    type Step = TransferStep;

    fn name(&self) -> &str {
        "transfer"
    }

    fn filter(&self) -> Filter {
        Filter::category("transfer")
    }

    fn start(&self, event: &RecordedEvent) -> Option<SagaPlan<TransferStep>> {
        if event.event_type != TRANSFER_REQUESTED {
            return None;
        }
        let r: TransferRequested = event.decode().ok()?;
        let mut steps = vec![SagaStep::Run(TransferStep::Debit {
            account: r.from.clone(),
            to: r.to.clone(),
            amount: r.amount,
            transfer_id: r.transfer_id.clone(),
        })];
        if r.needs_approval {
            steps.push(SagaStep::Await { step: TransferStep::AwaitApproval, timeout: self.approval_timeout });
        }
        steps.push(SagaStep::Run(TransferStep::Credit {
            account: r.to,
            from: r.from,
            amount: r.amount,
            transfer_id: r.transfer_id.clone(),
        }));
        Some(SagaPlan { id: r.transfer_id, steps })
    }

    fn correlate(&self, event: &RecordedEvent) -> Option<String> {
        (event.event_type == TRANSFER_APPROVED).then(|| event.stream.id().map(str::to_owned)).flatten()
    }

    fn satisfies(&self, step: &TransferStep, event: &RecordedEvent) -> bool {
        matches!(step, TransferStep::AwaitApproval) && event.event_type == TRANSFER_APPROVED
    }

    async fn execute(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        match step {
            TransferStep::Debit { account, to, amount, transfer_id } => {
                let cmd = AccountCommand::TransferOut {
                    to: to.clone(),
                    amount: *amount,
                    transfer_id: transfer_id.clone(),
                };
                self.repo.execute(account, &cmd, command).await?;
            }
            TransferStep::Credit { account, from, amount, transfer_id } => {
                let cmd = AccountCommand::TransferIn {
                    from: from.clone(),
                    amount: *amount,
                    transfer_id: transfer_id.clone(),
                };
                self.repo.execute(account, &cmd, command).await?;
            }
            TransferStep::AwaitApproval => {}
        }
        Ok(())
    }

    async fn compensate(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        if let TransferStep::Debit { account, to, amount, transfer_id } = step {
            // The refund: the money comes back from where it was headed.
            let cmd = AccountCommand::TransferIn {
                from: to.clone(),
                amount: *amount,
                transfer_id: format!("{transfer_id}-refund"),
            };
            self.repo.execute(account, &cmd, command).await?;
        }
        Ok(())
    }
}

/// Balances by account id, as the read model sees them.
pub type BalanceTable = Arc<RwLock<HashMap<String, Balance>>>;

/// One row of the read model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    /// Money in the account.
    pub balance: Cents,
    /// The next account version to apply: events below it were applied
    /// already, which makes replays idempotent.
    pub next_version: u64,
}

/// The balance read model: a projection of every account event.
pub struct BalanceProjection {
    /// The table it maintains.
    pub table: BalanceTable,
}

#[async_trait]
impl Projection for BalanceProjection {
    fn name(&self) -> &str {
        "balances"
    }

    fn filter(&self) -> Filter {
        Filter::category("account")
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let decoded: AccountEvent =
            annals::decode(event, &Upcasters::new()).map_err(|e| HandlerError::permanent(e.to_string()))?;
        let id = event.stream.id().unwrap_or_default().to_owned();
        let mut table = self.table.write().map_err(|_| HandlerError::new("balance table lock poisoned"))?;
        let row = table.entry(id).or_default();
        // At-least-once delivery: an event below the row's next version was
        // applied already.
        if event.version < row.next_version {
            return Ok(());
        }
        match decoded {
            AccountEvent::Deposited { amount } | AccountEvent::TransferredIn { amount, .. } => {
                row.balance = row.balance.saturating_add(amount);
            }
            AccountEvent::Withdrawn { amount } | AccountEvent::TransferredOut { amount, .. } => {
                row.balance = row.balance.saturating_sub(amount);
            }
            _ => {}
        }
        row.next_version = event.version + 1;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.table.write().map_err(|_| HandlerError::new("balance table lock poisoned"))?.clear();
        Ok(())
    }
}
