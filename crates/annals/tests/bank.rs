//! Every rule of the bank example, through the given/when/then harness, and
//! the transfer through a real repository.

#[path = "../examples/bank/domain.rs"]
#[allow(dead_code)]
mod domain;

use std::sync::Arc;

use annals::{CommandMetadata, Error, Repository, TestFramework};
use annals_core::{Appender, MemoryStore, ReadStream, StreamReader};
use domain::{Account, AccountCommand as C, AccountError, AccountEvent as E, Status, transfer};

fn opened() -> Vec<E> {
    vec![E::Opened { owner: "Ada".into() }]
}

fn funded(amount: u64) -> Vec<E> {
    vec![E::Opened { owner: "Ada".into() }, E::Deposited { amount }]
}

#[test]
fn opening() {
    TestFramework::<Account>::given_no_previous_events()
        .when(C::Open { owner: "Ada".into() })
        .then_expect_events(vec![E::Opened { owner: "Ada".into() }])
        .then_expect_state(|a| assert_eq!(a.status, Status::Open));
    TestFramework::<Account>::given(opened())
        .when(C::Open { owner: "Ada".into() })
        .then_expect_error(AccountError::AlreadyOpen);
    TestFramework::<Account>::given_no_previous_events()
        .when(C::Open { owner: "  ".into() })
        .then_expect_error(AccountError::NoOwner);
}

#[test]
fn nothing_works_before_opening() {
    for cmd in [C::Deposit { amount: 1 }, C::Withdraw { amount: 1 }, C::Lock { amount: 1 }, C::Close] {
        TestFramework::<Account>::given_no_previous_events()
            .when(cmd)
            .then_expect_error(AccountError::NotOpen);
    }
}

#[test]
fn deposits_must_be_positive() {
    TestFramework::<Account>::given(opened())
        .when(C::Deposit { amount: 10 })
        .then_expect_events(vec![E::Deposited { amount: 10 }])
        .then_expect_state(|a| assert_eq!(a.balance, 10));
    TestFramework::<Account>::given(opened())
        .when(C::Deposit { amount: 0 })
        .then_expect_error(AccountError::ZeroAmount);
}

#[test]
fn no_overdraft() {
    TestFramework::<Account>::given(funded(100))
        .when(C::Withdraw { amount: 100 })
        .then_expect_events(vec![E::Withdrawn { amount: 100 }])
        .then_expect_state(|a| assert_eq!(a.balance, 0));
    TestFramework::<Account>::given(funded(100))
        .when(C::Withdraw { amount: 101 })
        .then_expect_error(AccountError::InsufficientFunds { available: 100, requested: 101 });
    TestFramework::<Account>::given(funded(100))
        .when(C::Withdraw { amount: 0 })
        .then_expect_error(AccountError::ZeroAmount);
}

#[test]
fn locked_funds_are_unavailable() {
    let mut history = funded(100);
    history.push(E::FundsLocked { amount: 70 });
    TestFramework::<Account>::given(history.clone())
        .when(C::Withdraw { amount: 31 })
        .then_expect_error(AccountError::InsufficientFunds { available: 30, requested: 31 });
    TestFramework::<Account>::given(history.clone())
        .when(C::Withdraw { amount: 30 })
        .then_expect_events(vec![E::Withdrawn { amount: 30 }]);
    TestFramework::<Account>::given(history.clone())
        .when(C::Lock { amount: 31 })
        .then_expect_error(AccountError::InsufficientFunds { available: 30, requested: 31 });
    TestFramework::<Account>::given(history.clone())
        .when(C::TransferOut { to: "b".into(), amount: 31, transfer_id: "t".into() })
        .then_expect_error(AccountError::InsufficientFunds { available: 30, requested: 31 });
    // Unlocking makes them available again, but only what is locked.
    TestFramework::<Account>::given(history.clone())
        .when(C::Unlock { amount: 70 })
        .then_expect_events(vec![E::FundsUnlocked { amount: 70 }])
        .then_expect_state(|a| assert_eq!(a.available(), 100));
    TestFramework::<Account>::given(history)
        .when(C::Unlock { amount: 71 })
        .then_expect_error(AccountError::NotLocked { locked: 70, requested: 71 });
}

#[test]
fn closing_needs_an_empty_account_and_is_final() {
    TestFramework::<Account>::given(funded(5))
        .when(C::Close)
        .then_expect_error(AccountError::NotEmpty { balance: 5 });
    TestFramework::<Account>::given(opened()).when(C::Close).then_expect_events(vec![E::Closed]);
    let mut closed = opened();
    closed.push(E::Closed);
    for cmd in [
        C::Open { owner: "x".into() },
        C::Deposit { amount: 1 },
        C::Withdraw { amount: 1 },
        C::Lock { amount: 1 },
        C::Unlock { amount: 1 },
        C::TransferIn { from: "a".into(), amount: 1, transfer_id: "t".into() },
        C::Close,
    ] {
        TestFramework::<Account>::given(closed.clone()).when(cmd).then_expect_error(AccountError::Closed);
    }
}

#[test]
fn transfer_legs() {
    TestFramework::<Account>::given(funded(50))
        .when(C::TransferOut { to: "b".into(), amount: 50, transfer_id: "t".into() })
        .then_expect_events(vec![E::TransferredOut { to: "b".into(), amount: 50, transfer_id: "t".into() }]);
    TestFramework::<Account>::given(opened())
        .when(C::TransferIn { from: "a".into(), amount: 50, transfer_id: "t".into() })
        .then_expect_state(|a| assert_eq!(a.balance, 50));
}

async fn bank() -> (Arc<MemoryStore>, Repository<Account>) {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Account>::new(store.clone());
    for (id, amount) in [("a", 100), ("b", 0)] {
        repo.execute(id, &C::Open { owner: id.into() }, &CommandMetadata::new(format!("open-{id}")))
            .await
            .unwrap();
        if amount > 0 {
            repo.execute(id, &C::Deposit { amount }, &CommandMetadata::new(format!("dep-{id}")))
                .await
                .unwrap();
        }
    }
    (store, repo)
}

#[tokio::test]
async fn transfer_commits_both_streams_atomically_and_once() {
    let (store, repo) = bank().await;
    let meta = CommandMetadata::new("ignored").correlation_id("req-1");
    let done = transfer(&repo, "a", "b", 40, "t-1", &meta).await.unwrap();
    assert!(!done.duplicate);
    assert_eq!((done.from_version, done.to_version), (Some(2), Some(1)));
    // Both events sit at consecutive global positions: one commit.
    let a = store.read_stream(&repo.stream("a").unwrap(), ReadStream::backward().limit(1)).await.unwrap();
    let b = store.read_stream(&repo.stream("b").unwrap(), ReadStream::backward().limit(1)).await.unwrap();
    assert_eq!(a[0].position + 1, b[0].position);
    assert_eq!(a[0].metadata.correlation_id().as_deref(), Some("req-1"));
    assert_eq!(a[0].metadata.causation_id().as_deref(), Some("t-1/debit"));

    // Re-sending the transfer writes nothing.
    let again = transfer(&repo, "a", "b", 40, "t-1", &meta).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(repo.load("a").await.unwrap().state.balance, 60);
    assert_eq!(repo.load("b").await.unwrap().state.balance, 40);
}

#[tokio::test]
async fn a_rejected_leg_writes_nothing_on_either_side() {
    let (store, repo) = bank().await;
    let before = annals_core::AllReader::next_position(&*store).await.unwrap();
    let err = transfer(&repo, "a", "b", 1_000, "t-2", &CommandMetadata::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(AccountError::InsufficientFunds { .. })));
    let err = transfer(&repo, "a", "nobody", 10, "t-3", &CommandMetadata::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(AccountError::NotOpen)));
    let err = transfer(&repo, "a", "a", 10, "t-4", &CommandMetadata::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(AccountError::SameAccount)));
    assert_eq!(annals_core::AllReader::next_position(&*store).await.unwrap(), before);
}

#[tokio::test]
async fn a_concurrent_change_makes_the_transfer_redecide() {
    let (store, repo) = bank().await;
    // Decide a debit, then let someone else withdraw before it is appended:
    // the multi-append must fail as a whole.
    let debit = repo
        .decide(
            "a",
            &C::TransferOut { to: "b".into(), amount: 80, transfer_id: "t".into() },
            &CommandMetadata::new("t/debit"),
        )
        .await
        .unwrap();
    let credit = repo
        .decide(
            "b",
            &C::TransferIn { from: "a".into(), amount: 80, transfer_id: "t".into() },
            &CommandMetadata::new("t/credit"),
        )
        .await
        .unwrap();
    repo.execute("a", &C::Withdraw { amount: 50 }, &CommandMetadata::new("w")).await.unwrap();
    let err = store.append_multi(vec![debit.append().unwrap(), credit.append().unwrap()]).await.unwrap_err();
    assert!(matches!(err, annals_core::Error::WrongExpectedVersion { .. }));
    assert_eq!(repo.load("b").await.unwrap().state.balance, 0);
    // The helper re-decides and now sees the overdraft.
    let err = transfer(&repo, "a", "b", 80, "t", &CommandMetadata::new("x")).await.unwrap_err();
    assert!(matches!(err, Error::Rejected(AccountError::InsufficientFunds { available: 50, requested: 80 })));
}
