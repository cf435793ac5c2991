# capgate demo service: an in-memory key/value store with nested namespaces,
# attenuated read-only views, change callbacks and long polls.
#
# Contract: names and ordinals are stable; clients in other languages depend on them.
@0xd3b8a5c1f2e64a17;

interface Reader {
  get  @0 (key :Text) -> (value :Data, found :Bool);
  list @1 (prefix :Text) -> (keys :List(Text));
}

interface Namespace extends(Reader) {
  put      @0 (key :Text, value :Data) -> ();
  delete   @1 (key :Text) -> (existed :Bool);
  sub      @2 (name :Text) -> (ns :Namespace);        # nested namespace: deep pipelined chains
  readOnly @3 () -> (reader :Reader);                  # attenuated view of this namespace
  watch    @4 (watcher :Watcher) -> (subscription :Subscription);
  wait     @5 (key :Text) -> (value :Data);            # long poll: returns once key exists
  remove   @6 (name :Text) -> (existed :Bool);         # deletes sub-namespace `name`, all below it
}

interface Store {
  namespace  @0 (name :Text) -> (ns :Namespace);       # opens or creates
  namespaces @1 () -> (names :List(Text));
  remove     @2 (name :Text) -> (existed :Bool);       # deletes namespace `name`, all below it
}

interface Watcher      { changed @0 (key :Text, value :Data, deleted :Bool) -> (); }
interface Subscription { cancel  @0 () -> (); }
