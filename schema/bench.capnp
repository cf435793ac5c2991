# Interfaces used by capgate's benchmarks and tests. Not part of the demo contract.
@0xa4f1c0de5b7e9213;

interface Echo {
  # Returns its payload unchanged: the workload of the side-by-side benchmarks.
  echo  @0 (payload :Data) -> (payload :Data);
  # Fails inside the handler with a panic: proves a panicking handler only costs its connection.
  panic @1 () -> ();
}
