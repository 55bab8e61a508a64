//! The one shared watch over this stoker's pods: kube-runtime's watcher (list, watch, re-list
//! after 410 Gone or a broken connection, with its jittered backoff) feeding the pod index.

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use tracing::{info, warn};

use crate::index::PodIndex;
use crate::KubernetesBackend;

impl KubernetesBackend {
    /// Runs until the process ends. `Init` reaches the index before the watcher sends its LIST
    /// (kube-runtime emits it first), which is what lets a re-list judge only what its snapshot
    /// can prove (see [`PodIndex::relist_done`]).
    pub(crate) async fn watch(self, selector: String) {
        // MostRecent list semantics (the default): a quorum read, so the snapshot holds every
        // pod whose creation returned before the list was sent.
        let config = watcher::Config::default().labels(&selector);
        let mut stream = watcher::watcher(self.pods_api(&self.inner.watch_client), config)
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {
                    info!("pod watch: listing pods (start-up, or a re-list after 410 Gone)");
                    self.apply(|index| {
                        index.relist_started();
                        Vec::new()
                    })
                }
                Ok(watcher::Event::InitApply(p)) => self.apply(|index| index.relist_apply(&p)),
                Ok(watcher::Event::InitDone) => self.apply(PodIndex::relist_done),
                Ok(watcher::Event::Apply(p)) => self.apply(|index| index.apply(&p)),
                Ok(watcher::Event::Delete(p)) => self.apply(|index| index.delete(&p)),
                Err(err) => warn!(error = %err, "pod watch error; resuming with backoff"),
            }
        }
        warn!("pod watch ended");
    }
}
