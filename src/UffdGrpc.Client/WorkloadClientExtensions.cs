using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>Guest workloads and migration metrics through <see cref="UffdClient"/>: the calls recipes and checkers make.</summary>
public static class WorkloadClientExtensions
{
    /// <summary>Starts a guest workload in process <paramref name="mmId"/>.</summary>
    public static async Task<WorkloadInfo> StartWorkloadAsync(this UffdClient client, long mmId, WorkloadSpec spec, CancellationToken ct = default) =>
        (await client.Workloads.StartWorkloadAsync(new StartWorkloadRequest { MmId = mmId, Spec = spec }, cancellationToken: ct).ConfigureAwait(false)).Workload;

    public static async Task<WorkloadInfo> GetWorkloadAsync(this UffdClient client, long workloadId, CancellationToken ct = default) =>
        (await client.Workloads.GetWorkloadAsync(new GetWorkloadRequest { WorkloadId = workloadId }, cancellationToken: ct).ConfigureAwait(false)).Workload;

    /// <summary>Sleeps until the workload has ended and returns it.</summary>
    public static async Task<WorkloadInfo> WaitWorkloadAsync(this UffdClient client, long workloadId, CancellationToken ct = default) =>
        (await client.Workloads.WaitWorkloadAsync(new WaitWorkloadRequest { WorkloadId = workloadId }, cancellationToken: ct).ConfigureAwait(false)).Workload;

    /// <summary>Stops the workload (its threads exit) and returns it, ended.</summary>
    public static async Task<WorkloadInfo> StopWorkloadAsync(this UffdClient client, long workloadId, CancellationToken ct = default) =>
        (await client.Workloads.StopWorkloadAsync(new StopWorkloadRequest { WorkloadId = workloadId }, cancellationToken: ct).ConfigureAwait(false)).Workload;

    /// <summary>The whole write record of a workload (every page of it), and whether it was truncated.</summary>
    public static async Task<(IReadOnlyList<WorkloadWrite> Writes, bool Truncated)> ReadAllWritesAsync(this UffdClient client, long workloadId, CancellationToken ct = default)
    {
        var all = new List<WorkloadWrite>();
        ulong from = 0;
        while (true)
        {
            var r = await client.Workloads.ReadWritesAsync(new ReadWritesRequest { WorkloadId = workloadId, FromIndex = from }, cancellationToken: ct).ConfigureAwait(false);
            all.AddRange(r.Writes);
            from = r.NextIndex;
            if (r.Writes.Count == 0 || from >= r.Recorded)
                return (all, r.Truncated);
        }
    }

    /// <summary>The migration metrics of a machine, or of one of its processes (<paramref name="mmId"/>).</summary>
    public static async Task<GetMigrationMetricsResponse> GetMigrationMetricsAsync(this UffdClient client, long machineId, long mmId = 0, CancellationToken ct = default) =>
        await client.Metrics.GetMigrationMetricsAsync(new GetMigrationMetricsRequest { MachineId = machineId, MmId = mmId }, cancellationToken: ct).ConfigureAwait(false);
}
