namespace UffdGrpc.Mm;

/// <summary>Threads that come and go while their process lives on (a guest workload's).</summary>
public sealed partial class Kernel
{
    /// <summary>
    /// Creates a thread of <paramref name="mm"/> in blocktime group <paramref name="group"/>
    /// (a guest workload's thread, counted with its siblings as QEMU counts vCPUs).
    /// </summary>
    public SimThread CreateThread(Mm mm, BlocktimeGroup group)
    {
        using var _ = Enter();
        var t = CreateThread(mm);
        t.Group = group;
        group.Live++;
        group.EndAll(Now);
        return t;
    }

    /// <summary>
    /// Models do_exit (kernel/exit.c) of one thread whose process lives on (not the last; a
    /// thread asleep in handle_userfault first leaves the sleep, as a signal ends it, and its
    /// unread message is withdrawn): its operation is aborted.
    /// </summary>
    public void ExitThread(SimThread t)
    {
        using var _ = Enter();
        if (t.State != ThreadState.Exited)
            t.Exit();
    }
}
