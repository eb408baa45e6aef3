using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Running;
using UffdGrpc.Benchmarks;

// --allocation-gate: the allocation checks .ci/run runs (no timings). Anything else goes to
// BenchmarkDotNet, run from the repository root: e.g. --filter '*PageTable*', --list flat,
// or --inProcess to skip building a separate benchmark process. The build timeout is long
// because this machine class is shared (two cores; a build can wait minutes).
if (args is ["--allocation-gate"])
    return AllocationGate.Run(Console.Out);
var config = ManualConfig.Create(DefaultConfig.Instance).WithBuildTimeout(TimeSpan.FromMinutes(10));
BenchmarkSwitcher.FromAssembly(typeof(PopulatedRange).Assembly).Run(args, config);
return 0;
