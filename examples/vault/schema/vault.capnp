# The example service: boxes of values, a vault that is a box with more to it, and an admin
# interface nested in the vault.
@0xe4c9a0b1d2f35a67;

interface Box {
  store @0 (key :Text, value :Data) -> ();
  fetch @1 (key :Text) -> (value :Data, found :Bool);
}

interface Vault extends(Box) {
  open  @0 (name :Text) -> (box :Box);
  admin @1 () -> (admin :Admin);

  interface Admin {
    wipe @0 () -> (removed :UInt32);
  }
}
