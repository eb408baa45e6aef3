using UffdGrpc.Mm;
using ThreadState = UffdGrpc.Mm.ThreadState;

namespace UffdGrpc.UnitTests;

/// <summary>A thread killed at syscall entry gets an aborted call, never an exception (which would break its machine).</summary>
public class SyscallEntryKillTests
{
    [Fact]
    public void A_preempted_allocation_that_oom_kills_the_caller_at_syscall_entry_aborts_the_callers_call()
    {
        // 4 MiB of RAM (1024 frames). Process B holds 600 pages; process A's preempted write
        // of 800 pages continues a few pages at the start of each later call, until it runs
        // the OOM killer, whose victim is B (the larger RSS), at the entry of one of B's calls.
        var m = new Machine(config: new MachineConfig { MemoryBytes = 4UL << 20 });
        var b = m.T;
        var bAddr = m.Map(600);
        Assert.Equal(600, m.Write(bAddr, 1, 600).Done);
        var aMm = m.K.CreateMm();
        var a = m.K.CreateThread(aMm);
        const ulong AAddr = 0x7f00_0000_0000;
        Assert.Equal(Errno.OK, aMm.Mmap(AAddr, 800 * Machine.Pg, Prot.Read | Prot.Write, false, null, 0));
        m.K.SetSchedule(1, preempt: true);
        var aWrite = new AccessOp(AAddr, true, 2, 800, AccessOrigin.User);
        m.K.Start(a, aWrite);
        Assert.False(aWrite.IsCompleted);

        AccessOp? last = null;
        for (var i = 0; i < 100_000 && b.State != ThreadState.Exited; i++)
        {
            last = new AccessOp(bAddr, false, 0, 1, AccessOrigin.User);
            m.K.Start(b, last);
            Assert.True(last.IsCompleted);
        }
        Assert.Equal(ThreadState.Exited, b.State);
        Assert.True(last!.Aborted, "the call during whose entry the thread was killed is aborted");
        Assert.Equal(m.Mm.Id, m.K.OomKills[^1].VictimMmId);
        Assert.Empty(m.K.CheckInvariants());
    }
}
