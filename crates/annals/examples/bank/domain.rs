//! The bank domain: accounts with balances, locked funds and closing.
//!
//! Shared by `examples/bank/main.rs` and `tests/bank.rs`.

use annals::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// Money in cents.
pub type Cents = u64;

/// An account's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Lifecycle.
    pub status: Status,
    /// Owner's name.
    pub owner: String,
    /// Total money in the account, locked or not.
    pub balance: Cents,
    /// Money reserved (e.g. for a pending card payment); not available.
    pub locked: Cents,
}

/// Where an account is in its life.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Never opened.
    #[default]
    New,
    /// Open for business.
    Open,
    /// Closed for good.
    Closed,
}

impl Account {
    /// Money that can be withdrawn or locked.
    pub fn available(&self) -> Cents {
        self.balance.saturating_sub(self.locked)
    }
}

/// What can be asked of an account.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    /// Opens the account.
    Open { owner: String },
    /// Adds money.
    Deposit { amount: Cents },
    /// Takes money out.
    Withdraw { amount: Cents },
    /// Reserves money.
    Lock { amount: Cents },
    /// Releases reserved money.
    Unlock { amount: Cents },
    /// Sends money to another account (the debit side of a transfer).
    TransferOut { to: String, amount: Cents, transfer_id: String },
    /// Receives money from another account (the credit side).
    TransferIn { from: String, amount: Cents, transfer_id: String },
    /// Closes the account; it must be empty.
    Close,
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// The account was opened.
    Opened { owner: String },
    /// Money came in.
    Deposited { amount: Cents },
    /// Money went out.
    Withdrawn { amount: Cents },
    /// Money was reserved.
    FundsLocked { amount: Cents },
    /// Reserved money was released.
    FundsUnlocked { amount: Cents },
    /// Money left for another account.
    TransferredOut { to: String, amount: Cents, transfer_id: String },
    /// Money arrived from another account.
    TransferredIn { from: String, amount: Cents, transfer_id: String },
    /// The account was closed.
    Closed,
}

impl DomainEvent for AccountEvent {}

/// Why an account refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The account was never opened.
    #[error("the account is not open")]
    NotOpen,
    /// The account was opened already.
    #[error("the account is already open")]
    AlreadyOpen,
    /// The account is closed and accepts nothing.
    #[error("the account is closed")]
    Closed,
    /// Amounts must be positive.
    #[error("the amount must be greater than zero")]
    ZeroAmount,
    /// Not enough unlocked money.
    #[error("insufficient funds: {available} available, {requested} requested")]
    InsufficientFunds { available: Cents, requested: Cents },
    /// Unlocking more than is locked.
    #[error("only {locked} is locked, cannot unlock {requested}")]
    NotLocked { locked: Cents, requested: Cents },
    /// Closing an account that still holds money.
    #[error("the account still holds {balance}")]
    NotEmpty { balance: Cents },
    /// A transfer to the same account.
    #[error("cannot transfer to the same account")]
    SameAccount,
    /// The owner name is empty.
    #[error("the owner must not be empty")]
    NoOwner,
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand as C;
        use AccountEvent as E;
        match self.status {
            Status::Closed => return Err(AccountError::Closed),
            Status::New if !matches!(command, C::Open { .. }) => return Err(AccountError::NotOpen),
            Status::Open if matches!(command, C::Open { .. }) => return Err(AccountError::AlreadyOpen),
            _ => {}
        }
        let positive = |amount: Cents| if amount == 0 { Err(AccountError::ZeroAmount) } else { Ok(amount) };
        let available = |amount: Cents| {
            if amount > self.available() {
                Err(AccountError::InsufficientFunds { available: self.available(), requested: amount })
            } else {
                Ok(amount)
            }
        };
        Ok(match command {
            C::Open { owner } if owner.trim().is_empty() => return Err(AccountError::NoOwner),
            C::Open { owner } => vec![E::Opened { owner: owner.clone() }],
            C::Deposit { amount } => vec![E::Deposited { amount: positive(*amount)? }],
            C::Withdraw { amount } => vec![E::Withdrawn { amount: available(positive(*amount)?)? }],
            C::Lock { amount } => vec![E::FundsLocked { amount: available(positive(*amount)?)? }],
            C::Unlock { amount } => {
                let amount = positive(*amount)?;
                if amount > self.locked {
                    return Err(AccountError::NotLocked { locked: self.locked, requested: amount });
                }
                vec![E::FundsUnlocked { amount }]
            }
            C::TransferOut { to, amount, transfer_id } => vec![E::TransferredOut {
                to: to.clone(),
                amount: available(positive(*amount)?)?,
                transfer_id: transfer_id.clone(),
            }],
            C::TransferIn { from, amount, transfer_id } => vec![E::TransferredIn {
                from: from.clone(),
                amount: positive(*amount)?,
                transfer_id: transfer_id.clone(),
            }],
            C::Close if self.balance > 0 => return Err(AccountError::NotEmpty { balance: self.balance }),
            C::Close => vec![E::Closed],
        })
    }

    fn apply(&mut self, event: &AccountEvent) {
        // Only records facts; saturating arithmetic because replaying must
        // never panic, whatever the log holds.
        match event {
            AccountEvent::Opened { owner } => {
                self.status = Status::Open;
                self.owner = owner.clone();
            }
            AccountEvent::Deposited { amount } | AccountEvent::TransferredIn { amount, .. } => {
                self.balance = self.balance.saturating_add(*amount);
            }
            AccountEvent::Withdrawn { amount } | AccountEvent::TransferredOut { amount, .. } => {
                self.balance = self.balance.saturating_sub(*amount);
            }
            AccountEvent::FundsLocked { amount } => self.locked = self.locked.saturating_add(*amount),
            AccountEvent::FundsUnlocked { amount } => self.locked = self.locked.saturating_sub(*amount),
            AccountEvent::Closed => self.status = Status::Closed,
        }
    }
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    /// Version of the debited account after the transfer (for a
    /// duplicate: its current version).
    pub from_version: Option<u64>,
    /// Version of the credited account after the transfer (for a
    /// duplicate: its current version).
    pub to_version: Option<u64>,
    /// Whether this transfer id had been committed before.
    pub duplicate: bool,
}

/// Moves `amount` from one account to another in one atomic multi-stream
/// append: both accounts' events are written, each checked against the
/// version it was decided on, or neither is. The transfer id makes it
/// idempotent (each leg's command id is derived from it).
pub async fn transfer(
    repo: &annals::Repository<Account>,
    from: &str,
    to: &str,
    amount: Cents,
    transfer_id: &str,
    metadata: &annals::CommandMetadata,
) -> Result<Transferred, annals::Error<AccountError>> {
    if from == to {
        return Err(annals::Error::Rejected(AccountError::SameAccount));
    }
    let leg = |side: &str| {
        let mut m = metadata.clone();
        m.command_id = format!("{transfer_id}/{side}");
        m.correlation_id = Some(metadata.correlation_id.clone().unwrap_or_else(|| transfer_id.to_owned()));
        m
    };
    let (debit_meta, credit_meta) = (leg("debit"), leg("credit"));
    let debit_cmd =
        AccountCommand::TransferOut { to: to.to_owned(), amount, transfer_id: transfer_id.to_owned() };
    let credit_cmd =
        AccountCommand::TransferIn { from: from.to_owned(), amount, transfer_id: transfer_id.to_owned() };
    const ATTEMPTS: u32 = 10;
    for _ in 0..ATTEMPTS {
        let debit = repo.decide(from, &debit_cmd, &debit_meta).await?;
        let credit = repo.decide(to, &credit_cmd, &credit_meta).await?;
        let (Some(debit_part), Some(credit_part)) = (debit.append(), credit.append()) else {
            // Both legs are committed together, so a duplicate leg means the
            // whole transfer was committed before.
            let version = |d: &annals::Decision<Account>| match d.expected {
                annals_core::ExpectedVersion::Exact(v) => Some(v),
                _ => None,
            };
            return Ok(Transferred {
                from_version: version(&debit),
                to_version: version(&credit),
                duplicate: debit.duplicate || credit.duplicate,
            });
        };
        match repo.store().append_multi(vec![debit_part, credit_part]).await {
            Ok(results) => {
                let (Some(d), Some(c)) = (results.first().copied(), results.get(1).copied()) else {
                    return Err(annals::Error::Store(annals_core::Error::invalid(
                        "append_multi lost a part",
                    )));
                };
                repo.committed(debit, d).await;
                repo.committed(credit, c).await;
                return Ok(Transferred {
                    from_version: Some(d.last_version()),
                    to_version: Some(c.last_version()),
                    duplicate: false,
                });
            }
            // Someone changed one of the accounts since we decided: decide again.
            Err(annals_core::Error::WrongExpectedVersion { .. }) => tokio::task::yield_now().await,
            Err(e) => return Err(annals::Error::Store(e)),
        }
    }
    Err(annals::Error::Conflict {
        stream: repo.stream(from).map_err(annals::Error::widen)?,
        attempts: ATTEMPTS,
    })
}
