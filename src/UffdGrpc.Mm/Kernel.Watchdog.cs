namespace UffdGrpc.Mm;

/// <summary>
/// The hook a host's hung-userfault watchdog needs: the model says when a thread goes to
/// sleep in handle_userfault, and the watchdog ends a sleep that lasted too long the only way
/// the kernel ends one for good, with SIGKILL.
/// </summary>
public sealed partial class Kernel
{
    /// <summary>
    /// Raised under the lock each time a thread goes to sleep in handle_userfault; the second
    /// argument names that one sleep (pass it to <see cref="KillUserfaultSleeper"/>).
    /// </summary>
    public event Action<SimThread, object>? UserfaultSleep;

    internal void OnUserfaultSleep(SimThread t, UffdWaiter w) => UserfaultSleep?.Invoke(t, w);

    /// <summary>
    /// SIGKILL to <paramref name="t"/> if it still sleeps in the userfault <paramref name="sleep"/>
    /// names (a sleep that was woken, or a later sleep, is left alone): as a fatal signal to a
    /// thread asleep in handle_userfault, its thread group exits (its fault disappears; later
    /// fills of the mm get ESRCH). True when it was killed.
    /// </summary>
    public bool KillUserfaultSleeper(SimThread t, object sleep)
    {
        using var _ = Enter();
        if (sleep is not UffdWaiter w || w.Done || t.State != ThreadState.BlockedInUserfault || t.BlockedOn is not { } ctx || !ctx.FaultWaiters.Contains(w))
            return false;
        DeliverSignal(ctx, t, InjectSite.FatalSignal);
        return true;
    }
}
