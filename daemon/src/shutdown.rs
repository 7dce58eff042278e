//! Shutdown as a type: one [`Trigger`] flips it, any number of [`Shutdown`] handles
//! (cheap clones) wait for it. Tasks select on [`Shutdown::wait`] instead of each
//! carrying its own channel.

use tokio::sync::watch;

/// Flips every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Resolves once shutdown was triggered (or its trigger dropped).
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and the handle tasks wait on.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn handle(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Waits until shutdown was triggered; returns at once if it already was.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signalled() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let recv = |s: &mut Option<tokio::signal::unix::Signal>| {
        let s = s.take();
        async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        () = recv(&mut term) => {}
        () = recv(&mut int) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handle_sees_the_trigger() {
        let (trigger, a) = channel();
        let b = trigger.handle();
        assert!(!a.is_triggered());
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.wait().await }
        });
        trigger.trigger();
        waiting.await.expect("woke");
        a.wait().await;
        assert!(a.is_triggered() && b.is_triggered());
        drop(trigger);
        a.wait().await;
    }
}
