namespace UffdGrpc.Mm;

/// <summary>The event and signal sites of fault injection (see <see cref="InjectSite"/>).</summary>
public sealed partial class Kernel
{
    /// <summary>Pages or PMDs one firing of an event rule acts on at most.</summary>
    public const int InjectEventCap = 512;

    /// <summary>
    /// Applies a kernel-internal event rule: with an address range, to every candidate in it
    /// (at most <see cref="InjectEventCap"/>); without one, to one candidate the rule's PRNG
    /// picks among the address spaces in scope. Each address acted on is logged.
    /// </summary>
    private bool ApplyEvent(ActiveRule a, string detailPrefix)
    {
        var r = a.Rule;
        var mms = ScopeMms(r);
        var acted = false;
        if (r.End != 0 && r.Site == InjectSite.Reclaim)
        {
            // Reclaim of a range: shrink_folio_list over it as MADV_PAGEOUT's reclaim_pages does.
            foreach (var mm in mms)
            {
                foreach (var (s, e) in mm.InjectReclaimRange(r.Start, r.End))
                {
                    LogInjection(a, mm, null, null, s, $"{detailPrefix}reclaim {(e - s) / PageSize} pages");
                    acted = true;
                }
            }
        }
        else if (r.End != 0)
        {
            foreach (var mm in mms)
            {
                foreach (var addr in mm.InjectCandidates(r.Site, r.Start, r.End, InjectEventCap))
                {
                    if (mm.Exited)
                        break;
                    if (mm.ApplyInjectedEvent(r.Site, addr, a) is { } d)
                    {
                        LogInjection(a, mm, null, null, addr, detailPrefix + d);
                        acted = true;
                    }
                }
            }
        }
        else if (mms.Count > 0)
        {
            var mm = mms[(int)a.NextBelow(mms.Count)];
            var cands = mm.InjectCandidates(r.Site, 0, TaskSize, InjectEventCap);
            if (cands.Count > 0)
            {
                var addr = cands[(int)a.NextBelow(cands.Count)];
                if (mm.ApplyInjectedEvent(r.Site, addr, a) is { } d)
                {
                    LogInjection(a, mm, null, null, addr, detailPrefix + d);
                    acted = true;
                }
            }
        }
        return acted;
    }

    /// <summary>
    /// The signal sites, when a PAGEFAULT message is read: a rule in scope of the sleeping
    /// thread sends it a signal at that instant (so the handler holds a message whose thread
    /// is no longer waiting on it).
    /// </summary>
    internal void SignalAfterRead(UserfaultfdCtx ctx, UffdWaiter w)
    {
        if (_modelRules == 0)
            return;
        foreach (var site in (ReadOnlySpan<InjectSite>)[InjectSite.FatalSignal, InjectSite.Signal])
        {
            if (site == InjectSite.Signal && w.Origin != AccessOrigin.User)
                continue;
            if (Inject(site, w.Thread.Mm, ctx, w.Thread, w.Msg.RealAddress, SignalDetail(site)) is not null)
            {
                DeliverSignal(ctx, w.Thread, site);
                return;
            }
        }
    }

    /// <summary>Fires a signal rule now at one sleeping thread in its scope, picked by the rule's PRNG.</summary>
    private bool SignalSleepers(ActiveRule a, bool onDemand)
    {
        var r = a.Rule;
        var sleepers = _ctxs.Where(c => !c.Released && (r.UffdId is not { } u || c.Id == u))
            .SelectMany(c => c.FaultWaiters.Select(w => (Ctx: c, W: w)))
            .Where(x => (r.Site != InjectSite.Signal || x.W.Origin == AccessOrigin.User)
                        && (r.MmId is not { } m || x.W.Thread.Mm.Id == m)
                        && (r.Tid is not { } tid || x.W.Thread.Tid == tid)
                        && (r.End == 0 || (x.W.Msg.RealAddress >= r.Start && x.W.Msg.RealAddress < r.End)))
            .ToList();
        if (sleepers.Count == 0)
            return false;
        var (ctx, w) = sleepers[(int)a.NextBelow(sleepers.Count)];
        LogInjection(a, w.Thread.Mm, ctx, w.Thread, w.Msg.RealAddress, (onDemand ? "now " : "") + SignalDetail(r.Site));
        DeliverSignal(ctx, w.Thread, r.Site);
        return true;
    }

    private static string SignalDetail(InjectSite site) => site == InjectSite.FatalSignal ? "SIGKILL" : "SIGUSR1";

    /// <summary>
    /// A signal reaches a thread asleep in handle_userfault. A fatal one kills its thread
    /// group (do_exit of every thread, then exit_mmap: later fills of that mm get ESRCH). A
    /// non-fatal one, for a user-mode fault (TASK_INTERRUPTIBLE): the waiter leaves the
    /// queue, the fault returns VM_FAULT_RETRY, the handler runs on the way to user mode and
    /// the access faults again, queueing a new PAGEFAULT for the same address.
    /// </summary>
    private static void DeliverSignal(UserfaultfdCtx ctx, SimThread t, InjectSite site)
    {
        if (site == InjectSite.FatalSignal)
            t.Mm.Exit();
        else
            ctx.InterruptWaiter(t);
    }

    /// <summary>Releases the long-term pins a removed rule held (unpin_user_pages).</summary>
    private void ReleaseLongtermPins(ActiveRule a)
    {
        foreach (var p in a.Pinned)
        {
            p.Pins--;
            if (p.Pins == 0)
                MaybeFree(p);
        }
        a.Pinned.Clear();
    }
}
