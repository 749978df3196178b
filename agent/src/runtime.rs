//! Threads with a current-thread tokio runtime of their own: the FIB
//! reconciler (netlink waits for each reply; one thread keeps each batch a
//! single wakeup) and the IPAM block claims over the Kubernetes API (called
//! synchronously from inside the agent's runtime, where `block_on` panics).

use std::future::Future;
use std::io;
use std::thread::JoinHandle;

/// Start thread `name`, running the future `make` builds on a
/// current-thread runtime of its own until it finishes. The runtime is
/// built before the thread starts, so a failure to build it is this call's
/// error rather than a log line from the thread.
pub fn spawn_with_runtime<F, Fut>(name: &str, make: F) -> io::Result<JoinHandle<Fut::Output>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future,
    Fut::Output: Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || rt.block_on(make()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_future_runs_on_its_own_named_thread_with_timers() {
        let t = spawn_with_runtime("rt-test", || async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            std::thread::current().name().map(String::from)
        })
        .unwrap();
        assert_eq!(t.join().unwrap().as_deref(), Some("rt-test"));
    }
}
