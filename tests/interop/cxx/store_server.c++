// A Cap'n Proto C++ server (EzRpcServer) for the demo Store schema (schema/store.capnp):
// the second upstream the gateway interop test (tests/interop/gateway.sh) puts
// `capgate gateway` in front of. No capgate code: only libcapnp-rpc.
//
// Usage: store_server (tcp HOST PORT | unix PATH)
//
// PORT may be 0 (any free port). Prints `listening on tcp://HOST:PORT` (or
// `listening on unix:PATH`) once it accepts connections, then one line per call it receives
// (`call Interface.method key=...`) and one `live ...` line each time the number of its live
// capabilities changes, like tests/interop/store_server.py.
//
// Build (gateway.sh does): capnp compile -oc++:OUT --src-prefix=schema schema/store.capnp, then
//   g++ -std=c++17 -I OUT store_server.c++ OUT/store.capnp.c++ $(pkg-config --cflags --libs capnp-rpc)

#include "store.capnp.h"

#include <capnp/ez-rpc.h>
#include <kj/async.h>
#include <kj/debug.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

constexpr size_t MAX_NAME_BYTES = 256;
constexpr size_t MAX_PENDING_CHANGES = 64;

struct Live {
  long stores = 0, namespaces = 0, readers = 0, subscriptions = 0, watchers = 0;
} live;

void logLine(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void changed(long& counter, long delta) {
  counter += delta;
  logLine("live stores=" + std::to_string(live.stores) +
          " namespaces=" + std::to_string(live.namespaces) +
          " readers=" + std::to_string(live.readers) +
          " subscriptions=" + std::to_string(live.subscriptions) +
          " watchers=" + std::to_string(live.watchers));
}

// Keeps deliveries of ended watches running until they are done.
class Detached final : public kj::TaskSet::ErrorHandler {
 public:
  void taskFailed(kj::Exception&& e) override {
    logLine("detached task failed: " + std::string(e.getDescription().cStr()));
  }
};
Detached detachedErrors;
kj::TaskSet* detached = nullptr;

// One watch: the client's Watcher and the chain of deliveries to it, one at a time, in
// order.
struct Watch {
  Watcher::Client watcher;
  kj::Promise<void> tail = kj::READY_NOW;
  size_t pending = 0;
  bool failed = false;

  explicit Watch(Watcher::Client w) : watcher(kj::mv(w)) { changed(live.watchers, 1); }
  ~Watch() { changed(live.watchers, -1); }
};

struct NsData {
  std::map<std::string, std::string> keys;
  std::map<std::string, std::shared_ptr<NsData>> children;
  std::map<uint64_t, std::shared_ptr<Watch>> watchers;
  std::vector<kj::Own<kj::PromiseFulfiller<void>>> waiters;
  bool removed = false;

  void wake() {
    for (auto& f : waiters) f->fulfill();
    waiters.clear();
  }

  void notify(const std::string& key, const std::string& value, bool deleted);

  // Removed with everything below it: long polls wake to find it gone.
  void drop() {
    removed = true;
    wake();
    while (!watchers.empty()) endWatch(watchers.begin()->first);
    for (auto& c : children) c.second->drop();
    children.clear();
  }

  // Ends a watch: what is queued is still delivered, then the Watcher is released.
  void endWatch(uint64_t id) {
    auto it = watchers.find(id);
    if (it == watchers.end()) return;
    auto w = it->second;
    watchers.erase(it);
    detached->add(kj::mv(w->tail).then([w]() {}));
  }
};

void NsData::notify(const std::string& key, const std::string& value, bool deleted) {
  wake();
  std::vector<uint64_t> drop;
  for (auto& entry : watchers) {
    auto w = entry.second;
    if (w->failed || w->pending >= MAX_PENDING_CHANGES) {
      drop.push_back(entry.first);  // gone or too slow: dropped rather than buffered
      continue;
    }
    ++w->pending;
    w->tail = kj::mv(w->tail)
                  .then([w, key, value, deleted]() -> kj::Promise<void> {
                    if (w->failed) return kj::READY_NOW;
                    auto req = w->watcher.changedRequest();
                    req.setKey(key);
                    req.setValue(kj::arrayPtr(reinterpret_cast<const kj::byte*>(value.data()),
                                              value.size()));
                    req.setDeleted(deleted);
                    return req.send().ignoreResult();
                  })
                  .then([w]() { --w->pending; },
                        [w](kj::Exception&& e) {
                          --w->pending;
                          w->failed = true;
                          logLine("watcher failed; dropping it: " +
                                  std::string(e.getDescription().cStr()));
                        })
                  .eagerlyEvaluate(nullptr);
  }
  for (auto id : drop) endWatch(id);
}

std::shared_ptr<NsData> root = std::make_shared<NsData>();
uint64_t nextWatchId = 0;

kj::Exception gone() {
  return KJ_EXCEPTION(
      FAILED, "namespace no longer exists: it was removed (Store.remove or Namespace.remove)");
}

kj::Maybe<kj::Exception> checkName(const std::string& name) {
  if (name.empty()) return KJ_EXCEPTION(FAILED, "invalid namespace name: it must not be empty");
  if (name.size() > MAX_NAME_BYTES)
    return KJ_EXCEPTION(FAILED, "invalid namespace name: ", name.size(),
                        " bytes exceed max_name_bytes = ", MAX_NAME_BYTES);
  return nullptr;
}

std::string str(capnp::Text::Reader t) { return std::string(t.cStr(), t.size()); }

std::string str(capnp::Data::Reader d) {
  return std::string(reinterpret_cast<const char*>(d.begin()), d.size());
}

capnp::Data::Reader bytes(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

// Shared by Namespace and its read-only Reader view.
kj::Promise<void> doGet(const std::shared_ptr<NsData>& ns, capnp::CallContext<Reader::GetParams, Reader::GetResults> context) {
  auto key = str(context.getParams().getKey());
  logLine("call Reader.get key=" + key);
  if (ns->removed) return gone();
  auto results = context.getResults();
  auto it = ns->keys.find(key);
  results.setFound(it != ns->keys.end());
  if (it != ns->keys.end()) results.setValue(bytes(it->second));
  return kj::READY_NOW;
}

kj::Promise<void> doList(const std::shared_ptr<NsData>& ns, capnp::CallContext<Reader::ListParams, Reader::ListResults> context) {
  auto prefix = str(context.getParams().getPrefix());
  logLine("call Reader.list prefix=" + prefix);
  if (ns->removed) return gone();
  std::vector<std::string> keys;
  for (auto it = ns->keys.lower_bound(prefix);
       it != ns->keys.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
    keys.push_back(it->first);
  auto list = context.getResults().initKeys(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) list.set(i, keys[i]);
  return kj::READY_NOW;
}

// Opens (or creates) the namespace `name` under `parent`; throws if it cannot.
std::shared_ptr<NsData> open(const std::shared_ptr<NsData>& parent, const std::string& name) {
  KJ_IF_MAYBE(e, checkName(name)) { kj::throwFatalException(kj::mv(*e)); }
  if (parent->removed) kj::throwFatalException(gone());
  auto& child = parent->children[name];
  if (!child) child = std::make_shared<NsData>();
  return child;
}

bool removeChild(const std::shared_ptr<NsData>& parent, const std::string& name) {
  auto it = parent->children.find(name);
  if (it == parent->children.end()) return false;
  auto ns = it->second;
  parent->children.erase(it);
  ns->drop();
  return true;
}

class ReaderImpl final : public Reader::Server {
 public:
  explicit ReaderImpl(std::shared_ptr<NsData> ns) : ns(kj::mv(ns)) { changed(live.readers, 1); }
  ~ReaderImpl() { changed(live.readers, -1); }

  kj::Promise<void> get(GetContext context) override { return doGet(ns, context); }
  kj::Promise<void> list(ListContext context) override { return doList(ns, context); }

 private:
  std::shared_ptr<NsData> ns;
};

class SubscriptionImpl final : public Subscription::Server {
 public:
  SubscriptionImpl(std::shared_ptr<NsData> ns, uint64_t id) : ns(kj::mv(ns)), id(id) {
    changed(live.subscriptions, 1);
  }
  ~SubscriptionImpl() {
    ns->endWatch(id);
    changed(live.subscriptions, -1);
  }

  kj::Promise<void> cancel(CancelContext) override {
    logLine("call Subscription.cancel");
    ns->endWatch(id);
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<NsData> ns;
  uint64_t id;
};

kj::Promise<void> waitFor(std::shared_ptr<NsData> ns, std::string key,
                          capnp::CallContext<Namespace::WaitParams, Namespace::WaitResults> context) {
  if (ns->removed) return gone();
  auto it = ns->keys.find(key);
  if (it != ns->keys.end()) {
    context.getResults().setValue(bytes(it->second));
    return kj::READY_NOW;
  }
  auto paf = kj::newPromiseAndFulfiller<void>();
  ns->waiters.push_back(kj::mv(paf.fulfiller));
  return paf.promise.then([ns, key, context]() mutable { return waitFor(ns, key, context); });
}

class NamespaceImpl final : public Namespace::Server {
 public:
  explicit NamespaceImpl(std::shared_ptr<NsData> ns) : ns(kj::mv(ns)) {
    changed(live.namespaces, 1);
  }
  ~NamespaceImpl() { changed(live.namespaces, -1); }

  kj::Promise<void> get(GetContext context) override { return doGet(ns, context); }
  kj::Promise<void> list(ListContext context) override { return doList(ns, context); }

  kj::Promise<void> put(PutContext context) override {
    auto params = context.getParams();
    auto key = str(params.getKey());
    logLine("call Namespace.put key=" + key);
    if (ns->removed) return gone();
    auto value = str(params.getValue());
    ns->keys[key] = value;
    ns->notify(key, value, false);
    return kj::READY_NOW;
  }

  kj::Promise<void> delete_(DeleteContext context) override {
    auto key = str(context.getParams().getKey());
    logLine("call Namespace.delete key=" + key);
    if (ns->removed) return gone();
    bool existed = ns->keys.erase(key) > 0;
    if (existed) ns->notify(key, "", true);
    context.getResults().setExisted(existed);
    return kj::READY_NOW;
  }

  kj::Promise<void> sub(SubContext context) override {
    auto name = str(context.getParams().getName());
    logLine("call Namespace.sub name=" + name);
    context.getResults().setNs(kj::heap<NamespaceImpl>(open(ns, name)));
    return kj::READY_NOW;
  }

  kj::Promise<void> readOnly(ReadOnlyContext context) override {
    logLine("call Namespace.readOnly");
    if (ns->removed) return gone();
    context.getResults().setReader(kj::heap<ReaderImpl>(ns));
    return kj::READY_NOW;
  }

  kj::Promise<void> watch(WatchContext context) override {
    logLine("call Namespace.watch");
    if (ns->removed) return gone();
    auto id = ++nextWatchId;
    ns->watchers[id] = std::make_shared<Watch>(context.getParams().getWatcher());
    // The Watch holds the Watcher: release the params now (else they, and the Watcher with
    // them, stay until the caller's Finish).
    context.releaseParams();
    context.getResults().setSubscription(kj::heap<SubscriptionImpl>(ns, id));
    return kj::READY_NOW;
  }

  kj::Promise<void> wait(WaitContext context) override {
    auto key = str(context.getParams().getKey());
    logLine("call Namespace.wait key=" + key);
    return waitFor(ns, key, context);
  }

  kj::Promise<void> remove(RemoveContext context) override {
    auto name = str(context.getParams().getName());
    logLine("call Namespace.remove name=" + name);
    if (ns->removed) return gone();
    context.getResults().setExisted(removeChild(ns, name));
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<NsData> ns;
};

class StoreImpl final : public Store::Server {
 public:
  StoreImpl() { changed(live.stores, 1); }
  ~StoreImpl() { changed(live.stores, -1); }

  kj::Promise<void> namespace_(NamespaceContext context) override {
    auto name = str(context.getParams().getName());
    logLine("call Store.namespace name=" + name);
    context.getResults().setNs(kj::heap<NamespaceImpl>(open(root, name)));
    return kj::READY_NOW;
  }

  kj::Promise<void> namespaces(NamespacesContext context) override {
    logLine("call Store.namespaces");
    auto list = context.getResults().initNames(root->children.size());
    size_t i = 0;
    for (auto& c : root->children) list.set(i++, c.first);
    return kj::READY_NOW;
  }

  kj::Promise<void> remove(RemoveContext context) override {
    auto name = str(context.getParams().getName());
    logLine("call Store.remove name=" + name);
    context.getResults().setExisted(removeChild(root, name));
    return kj::READY_NOW;
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string address;
  if (argc == 4 && std::string(argv[1]) == "tcp") {
    address = std::string(argv[2]) + ":" + argv[3];
  } else if (argc == 3 && std::string(argv[1]) == "unix") {
    unlink(argv[2]);
    address = std::string("unix:") + argv[2];
  } else {
    std::fprintf(stderr, "usage: %s (tcp HOST PORT | unix PATH)\n", argv[0]);
    return 2;
  }
  // One Store for every connection (the Python server makes one per connection).
  capnp::EzRpcServer server(kj::heap<StoreImpl>(), address.c_str());
  auto& waitScope = server.getWaitScope();
  kj::TaskSet tasks(detachedErrors);
  detached = &tasks;
  uint port = server.getPort().wait(waitScope);
  if (argc == 4) {
    logLine("listening on tcp://" + std::string(argv[2]) + ":" + std::to_string(port));
  } else {
    logLine("listening on " + address);
  }
  kj::NEVER_DONE.wait(waitScope);
}
