using Grpc.Core;
using UffdGrpc.Client;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Recipes;

/// <summary>
/// A guest run by the server (WorkloadService): its threads access the range on their own,
/// through the same model path as Access, sleeping in userfaults until a handler resolves
/// them; the server records every write with its machine-wide sequence number. The run ends
/// when the workload finishes, when <see cref="GuestPlan.Stop"/> is cancelled (StopWorkload),
/// or when it made no progress for <see cref="GuestPlan.Stall"/> (stopped and reported as a
/// stall: the bound that turns a handler that never resolves a fault into a failed check).
/// </summary>
public sealed class WorkloadGuest(UffdClient client) : IGuest
{
    /// <summary>Target page writes per second for the whole workload (0: as fast as it goes).</summary>
    public double DirtyRate { get; init; }

    public async Task<GuestRun> RunAsync(GuestPlan plan, CancellationToken ct)
    {
        if (plan.Gate is not null || plan.WritablePages is not null)
            throw new ArgumentException("a server-side workload runs free: no interleaver, no page subset", nameof(plan));
        var spec = new WorkloadSpec
        {
            Start = plan.Start,
            Length = (ulong)plan.Pages * PageCheck.PageSize,
            Pattern = plan.Pattern switch
            {
                AccessPattern.Sequential => WorkloadPattern.Sequential,
                AccessPattern.HotSet => WorkloadPattern.Hotset9010,
                _ => WorkloadPattern.Uniform,
            },
            Seed = plan.Seed,
            Threads = (uint)plan.Threads,
            WriteRatio = plan.WriteRatio,
            OpCount = (ulong)plan.Threads * (ulong)plan.Ops,
            DirtyRatePagesPerSec = DirtyRate,
        };
        var w = (await client.Workloads.StartWorkloadAsync(new StartWorkloadRequest { MmId = plan.MmId, Spec = spec }, cancellationToken: ct).ConfigureAwait(false)).Workload;
        string? stalled = null;
        var lastOps = w.Ops;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct, plan.Stop);
        while (w.State == WorkloadState.Running)
        {
            using var bound = CancellationTokenSource.CreateLinkedTokenSource(stop.Token);
            bound.CancelAfter(plan.Stall);
            try
            {
                w = (await client.Workloads.WaitWorkloadAsync(new WaitWorkloadRequest { WorkloadId = w.WorkloadId }, cancellationToken: bound.Token).ConfigureAwait(false)).Workload;
            }
            catch (Exception e) when (e is RpcException or OperationCanceledException && bound.IsCancellationRequested && !ct.IsCancellationRequested)
            {
                // The wait was cancelled here (its bound, or the stop): whatever status the
                // call ended with (CANCELLED, or the server's answer to the cancellation when
                // it arrives first, as on the in-memory test server), look at the workload.
            }
            if (w.State == WorkloadState.Running && bound.IsCancellationRequested && !ct.IsCancellationRequested)
            {
                var before = lastOps;
                w = (await client.Workloads.GetWorkloadAsync(new GetWorkloadRequest { WorkloadId = w.WorkloadId }, cancellationToken: ct).ConfigureAwait(false)).Workload;
                lastOps = w.Ops;
                var stopNow = plan.Stop.IsCancellationRequested;
                if (!stopNow && w.Ops == before)
                {
                    var asleep = w.Threads.FirstOrDefault(t => t.State == UffdGrpc.Contracts.V1.ThreadState.BlockedInUserfault);
                    stalled = $"guest workload {w.WorkloadId}: no access completed for {plan.Stall.TotalMilliseconds:0} ms ({w.Ops} of {spec.OpCount} done{(asleep is null ? "" : $"; thread {asleep.ThreadId} asleep in a userfault")})";
                }
                if (stopNow || stalled is not null)
                    w = (await client.Workloads.StopWorkloadAsync(new StopWorkloadRequest { WorkloadId = w.WorkloadId }, cancellationToken: ct).ConfigureAwait(false)).Workload;
            }
        }
        var writes = new List<GuestWrite>();
        ulong from = 0;
        while (true)
        {
            var r = await client.Workloads.ReadWritesAsync(new ReadWritesRequest { WorkloadId = w.WorkloadId, FromIndex = from }, cancellationToken: ct).ConfigureAwait(false);
            foreach (var x in r.Writes)
                writes.Add(new GuestWrite((int)((x.Page - plan.Start) / PageCheck.PageSize), (int)x.Generation, (int)x.ThreadId, (long)x.Seq));
            if (r.Writes.Count == 0 || r.NextIndex >= r.Recorded)
                break;
            from = r.NextIndex;
        }
        if (w.WritesTruncated)
            stalled ??= $"guest workload {w.WorkloadId}: its write record is truncated at {w.WritesRecorded} writes";
        return new GuestRun((long)spec.OpCount, (long)w.Ops, stalled, writes) { BlocktimeNs = w.BlocktimeNs, Userfaults = (long)w.Userfaults };
    }
}
