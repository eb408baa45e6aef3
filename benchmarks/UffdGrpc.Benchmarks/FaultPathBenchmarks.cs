using BenchmarkDotNet.Attributes;
using UffdGrpc.Mm;

namespace UffdGrpc.Benchmarks;

/// <summary>The fault path in-process: a write to a present page, and the uffd-wp fault round trip (write blocks, message read, un-protect wakes it).</summary>
[MemoryDiagnoser]
public class FaultPathBenchmarks
{
    private PopulatedRange _r = null!;
    private byte _v;

    [GlobalSetup]
    public void Setup() => _r = new PopulatedRange(512, registerWp: true);

    /// <summary>A one-page write access to a present, writable page (the MMU step, no fault).</summary>
    [Benchmark]
    public bool WritePresentPage()
    {
        var op = new AccessOp(PopulatedRange.A, true, 0, 1, AccessOrigin.User);
        _r.K.Start(_r.T, op);
        return op.IsCompleted;
    }

    /// <summary>UFFDIO_WRITEPROTECT one page, the write that blocks in handle_userfault, read(2) of its message, UFFDIO_WRITEPROTECT(0) that wakes and completes it.</summary>
    [Benchmark]
    public bool UffdWpRoundTrip()
    {
        var ctx = _r.Ctx!;
        var page = PopulatedRange.A + PopulatedRange.Pg;
        ctx.Writeprotect(page, PopulatedRange.Pg, Uapi.WriteprotectModeWp);
        var op = new AccessOp(page, true, _v++, 1, AccessOrigin.User);
        _r.K.Start(_r.T, op);
        ctx.Read(out var msg);
        ctx.Writeprotect(msg!.Address & ~(PopulatedRange.Pg - 1), PopulatedRange.Pg, 0);
        return op.IsCompleted;
    }
}
