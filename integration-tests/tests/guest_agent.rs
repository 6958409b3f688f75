//! The test guest's agent: bookworm's qemu-ga on a virtio-serial port answers over the host socket, and
//! guest-fsfreeze really stops the guest's writes until thawed.

use std::time::Duration;

use integration_tests::MIB;
use integration_tests::guest::TestGuest;
use serde_json::json;

/// How long a frozen guest is watched for writes it should not be able to make.
const FROZEN_OBSERVATION: Duration = Duration::from_secs(2);

async fn guest_with_agent() -> TestGuest {
    let mut guest = TestGuest::builder().disk("disk0", 64 * MIB).agent().start().await;
    guest.wait_ready().await;
    guest
}

#[tokio::test]
async fn agent_answers_ping() {
    let guest = guest_with_agent().await;
    let mut qga = guest.qga().await;
    assert_eq!(qga.execute("guest-ping", None).await, json!({}));
    let info = qga.execute("guest-info", None).await;
    assert!(
        info["version"].as_str().is_some_and(|v| v.starts_with("7.2")),
        "{info}"
    );
}

#[tokio::test]
async fn fsfreeze_stops_writes_until_thaw() {
    let mut guest = guest_with_agent().await;
    guest.wait_for_file(2).await;
    let mut qga = guest.qga().await;
    assert_eq!(qga.execute("guest-fsfreeze-status", None).await, "thawed");

    let frozen = qga.execute("guest-fsfreeze-freeze", None).await;
    assert_eq!(frozen, json!(1), "one file system (the data disk) frozen");
    assert_eq!(qga.execute("guest-fsfreeze-status", None).await, "frozen");
    let at_freeze = guest.files_written();
    tokio::time::sleep(FROZEN_OBSERVATION).await;
    // A running guest creates a file every few tens of milliseconds. While frozen, only lines already on their
    // way over the serial port, or of a file whose manifest line was synced just before the freeze, can arrive.
    let after = guest.files_written();
    assert!(
        after <= at_freeze + 2,
        "the guest wrote files {at_freeze}..{after} while frozen"
    );

    assert_eq!(qga.execute("guest-fsfreeze-thaw", None).await, json!(1));
    assert_eq!(qga.execute("guest-fsfreeze-status", None).await, "thawed");
    guest.wait_for_file(after + 2).await;
}
