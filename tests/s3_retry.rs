//! Throttling and 5xx answers from the S3 store are retried: a real guest is backed up to, and
//! restored from, the Garage node through a fault-injecting proxy on loopback
//! (`vmbackup_testkit::s3_proxy`) that answers a share of the requests itself with `503
//! SlowDown`, `500 InternalError` or `429 TooManyRequests`. A store that throttles and never
//! recovers fails a backup cleanly, in bounded time, with backoff between the attempts.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmbackup_testkit::cli::Run;
use vmbackup_testkit::faults::{vm_violations, FaultRun};
use vmbackup_testkit::garage::S3Place;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};
use vmbackup_testkit::s3_proxy::{Injected, Kind, Policy, S3Proxy, Seen};

/// `place.run`, through `proxy`, with `extra` settings.
fn through(place: &S3Place, proxy: &S3Proxy, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let env = proxy.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra);
    place.run_env(binary(), args, &env, &[])
}

#[test]
fn a_backup_verify_and_restore_succeed_while_a_third_of_requests_are_throttled_or_fail() {
    let vm = TestVmBuilder::new("s3-retry")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
    vm.write_file("/mnt/vdb/data", &payload).unwrap();
    let place = S3Place::new("retry");
    // The first request of each kind, and every third after it, gets 503, 500, 429 in turn.
    let proxy = S3Proxy::start(
        &place.garage.endpoint,
        Policy::EveryNth {
            n: 3,
            errors: Injected::ALL.to_vec(),
        },
    );

    let b = through(&place, &proxy, &["backup", vm.name()], &[]);
    ok(&b, "backup through the failing proxy");
    let id = b.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        b.stderr.contains("backing off"),
        "no retry in the log:\n{}",
        b.stderr
    );
    let v = through(&place, &proxy, &["verify"], &[]);
    ok(&v, "verify through the failing proxy");
    assert_eq!(v.json["backups"][0]["ok"], true, "{}", v.json);
    let l = through(&place, &proxy, &["list"], &[]);
    ok(&l, "list");
    assert_eq!(ids(&l), vec![id.clone()]);

    // Restore: the guest reads what it had.
    vm.write_file("/mnt/vdb/data", b"changed after the backup")
        .unwrap();
    let r = through(
        &place,
        &proxy,
        &["restore", &id, "--force", "--power-off"],
        &[],
    );
    ok(&r, "restore through the failing proxy");
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert!(
        vm.read_file("/mnt/vdb/data").unwrap() == payload,
        "the restored guest does not read the backed-up data"
    );

    // Every kind of error was injected, into every kind of request, and retried past.
    let injected = proxy.injected();
    let forwarded = proxy.forwarded();
    eprintln!("injected: {injected:?}\nforwarded: {forwarded:?}");
    for e in Injected::ALL {
        assert!(proxy.injected_of(e) > 0, "no {e:?} injected: {injected:?}");
    }
    for k in Kind::ALL {
        assert!(
            proxy.injected_into(k) > 0 && forwarded.get(&k).copied().unwrap_or(0) > 0,
            "{k:?}: injected {injected:?}, forwarded {forwarded:?}"
        );
    }
    let all: u64 = injected.values().sum::<u64>() + forwarded.values().sum::<u64>();
    let failed: u64 = injected.values().sum();
    assert!(failed * 4 > all, "about a third failed: {failed} of {all}");
    assert!(proxy.problems().is_empty(), "{:?}", proxy.problems());
    // Chunks go up with an unsigned payload (their names check them); everything else is
    // signed with its body's hash.
    let puts: Vec<_> = proxy
        .log()
        .into_iter()
        .filter(|s| s.method == "PUT")
        .collect();
    let is_chunk = |s: &Seen| s.target.contains("/chunks/");
    assert!(puts.iter().any(is_chunk) && !puts.iter().all(is_chunk));
    for s in &puts {
        let hash = s.payload_hash.as_deref().unwrap_or_default();
        if is_chunk(s) {
            assert_eq!(hash, "UNSIGNED-PAYLOAD", "{}", s.target);
        } else {
            assert!(
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "{}: {hash}",
                s.target
            );
        }
    }
    // The repository, read straight from Garage, is whole.
    let v = place.run(binary(), &["verify"]);
    ok(&v, "verify straight from Garage");
}

/// The gaps between the attempts of each request the proxy failed after `since`, per request
/// (method and target), in order.
fn retry_gaps(proxy: &S3Proxy, since: Instant) -> Vec<Vec<Duration>> {
    let mut attempts: BTreeMap<(String, String), Vec<Instant>> = BTreeMap::new();
    for s in proxy.log() {
        if s.at >= since && s.injected.is_some() {
            attempts.entry((s.method, s.target)).or_default().push(s.at);
        }
    }
    attempts
        .into_values()
        .filter(|a| a.len() >= 2)
        .map(|a| a.windows(2).map(|w| w[1] - w[0]).collect())
        .collect()
}

#[test]
fn a_store_that_throttles_for_good_fails_a_backup_cleanly_with_backoff_and_the_next_works() {
    let vm = TestVmBuilder::new("s3-throttle")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    // 12 MiB of new data: several chunks to upload.
    vm.sh("dd if=/dev/urandom of=/mnt/vdb/data bs=1M count=12 2>/dev/null && sync")
        .unwrap();
    let images: Vec<String> = vm
        .disk_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let place = S3Place::new("throttle");
    let proxy = S3Proxy::start(&place.garage.endpoint, Policy::Forward);
    let env: Vec<(&str, String)> = place
        .garage
        .env()
        .into_iter()
        .chain(proxy.env())
        // Each request is retried for 3 s before the backup gives up.
        .chain([("VMBACKUP_S3_RETRY_SECS", "3".to_string())])
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Held (SIGSTOP) after its second new chunk, its overlays in place.
    let url = place.url();
    let mut run = FaultRun::start_at(
        binary(),
        Path::new(&url),
        &place.state(),
        &["backup", vm.name()],
        "backup-chunk-written=stop@2",
        &env,
    );
    run.wait_stopped(Duration::from_secs(120));
    // From now on the store answers every request with 503 SlowDown.
    proxy.set_policy(Policy::All(Injected::SlowDown));
    let switched = Instant::now();
    kill(Pid::from_raw(run.child.id() as i32), Signal::SIGCONT).unwrap();
    let code = run.wait(Duration::from_secs(300));
    let took = switched.elapsed();
    let (stdout, stderr) = (run.stdout(), run.stderr());

    assert_eq!(code, 1, "{stderr}\n{stdout}");
    let doc = vmbackup_testkit::cli::parse_one_document(&stdout).unwrap();
    let error = doc["results"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    // (A HEAD's answer has no body to carry the code `SlowDown`: the status names it.)
    assert!(
        error.contains("S3") && error.contains("503 Service Unavailable"),
        "a clean error naming the store's answer: {doc}"
    );
    for text in [&stdout, &stderr] {
        assert!(
            !text.contains(&place.garage.secret),
            "the secret key leaked"
        );
    }
    // Bounded: a few requests in turn, each given up after its 3 s (and one last wait).
    assert!(
        took < Duration::from_secs(90),
        "the failing backup took {took:?}"
    );
    eprintln!("the throttled backup failed {took:?} after the store began to throttle");

    // Retried, and with growing waits, not hammering.
    let gaps = retry_gaps(&proxy, switched);
    assert!(
        !gaps.is_empty(),
        "no request was retried: {:?}",
        proxy.log()
    );
    let all: Vec<Duration> = gaps.iter().flatten().copied().collect();
    let shortest = all.iter().min().unwrap();
    assert!(
        *shortest >= Duration::from_millis(80),
        "attempts {shortest:?} apart: {gaps:?}"
    );
    let long: Vec<&Vec<Duration>> = gaps.iter().filter(|g| g.len() >= 4).collect();
    assert!(
        !long.is_empty(),
        "no request was tried 5 times in 3 s: {gaps:?}"
    );
    let mean = |d: Vec<Duration>| d.iter().sum::<Duration>() / d.len().max(1) as u32;
    let first = mean(long.iter().map(|g| g[0]).collect());
    let last = mean(long.iter().map(|g| *g.last().unwrap()).collect());
    eprintln!(
        "{} requests retried; mean first wait {first:?}, mean last wait {last:?}",
        gaps.len()
    );
    assert!(
        last >= first * 3,
        "the waits do not grow: first {first:?}, last {last:?}: {gaps:?}"
    );
    // Far fewer attempts than a client that does not wait would make.
    let attempts = proxy
        .log()
        .iter()
        .filter(|s| s.at >= switched && s.injected.is_some())
        .count() as f64;
    assert!(
        attempts / took.as_secs_f64() < 20.0,
        "{attempts} attempts in {took:?}"
    );

    // The VM runs on its own images, no overlay left; nothing was published.
    let bad = vm_violations(&vm, &images);
    assert!(bad.is_empty(), "{bad:?}");
    let l = place.run(binary(), &["list"]);
    ok(&l, "list straight from Garage");
    assert_eq!(ids(&l), Vec::<String>::new(), "{}", l.json);

    // The next backup, with the store well again, works and verifies.
    let b = place.run(binary(), &["backup", vm.name()]);
    ok(&b, "the next backup");
    let v = place.run(binary(), &["verify"]);
    ok(&v, "verify");
    assert_eq!(v.json["backups"][0]["ok"], true, "{}", v.json);
    assert!(proxy.problems().is_empty(), "{:?}", proxy.problems());
}

/// A store that throttles from the first request is a failure of the store (exit 1) after the
/// retries, not a wrong endpoint or bad input (exit 2), whatever the answer.
#[test]
fn a_store_throttling_from_the_first_request_is_a_store_failure_not_bad_input() {
    let place = S3Place::new("throttle-first");
    for error in [Injected::SlowDown, Injected::TooManyRequests] {
        let proxy = S3Proxy::start(&place.garage.endpoint, Policy::All(error));
        let started = Instant::now();
        let r = through(
            &place,
            &proxy,
            &["list"],
            &[("VMBACKUP_S3_RETRY_SECS", "2")],
        );
        let took = started.elapsed();
        assert_eq!(r.code, 1, "{error:?}: {}\n{}", r.json, r.stderr);
        let message = r.json["error"]["message"].as_str().unwrap_or_default();
        let code = match error {
            Injected::SlowDown => "SlowDown",
            _ => "TooManyRequests",
        };
        assert!(
            message.contains("S3") && message.contains(code),
            "{error:?}: {message:?}"
        );
        assert!(!message.contains("cannot be reached"), "{message:?}");
        assert!(
            took < Duration::from_secs(40),
            "{error:?}: gave up after {took:?}"
        );
        // Retried before giving up.
        assert!(proxy.log().len() >= 4, "{:?}", proxy.log());
        assert!(
            !r.stderr.contains(&place.garage.secret)
                && !r.json.to_string().contains(&place.garage.secret),
            "the secret key leaked"
        );
    }
    assert!(place.objects().is_empty(), "{:?}", place.objects());
    assert!(
        !place.state().exists(),
        "a failed run created its state folder"
    );
}
