using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>Guest workloads: validate, create the threads under the machine lock, start their loops (<see cref="WorkloadEntry"/>).</summary>
public sealed class WorkloadService(MachineRegistry registry) : Contracts.V1.WorkloadService.WorkloadServiceBase
{
    /// <summary>The most writes one ReadWrites call returns.</summary>
    public const int MaxWritesPerCall = 65536;

    private WorkloadEntry Workload(long id) => registry.Get<WorkloadEntry>(id, "workload_id");

    private static WorkloadInfo Info(WorkloadEntry w) => w.Host.Kernel.Locked(() => w.Info(ProtoMapping.StateOf));

    internal static Model.GuestWorkloadSpec ToModel(WorkloadSpec s) => new(
        s.Start, s.Length,
        s.Pattern switch
        {
            WorkloadPattern.Sequential => Model.GuestPattern.Sequential,
            WorkloadPattern.Uniform => Model.GuestPattern.Uniform,
            WorkloadPattern.HotsetZipf => Model.GuestPattern.HotsetZipf,
            WorkloadPattern.Hotset9010 => Model.GuestPattern.Hotset9010,
            WorkloadPattern.QemuMigrationTest => Model.GuestPattern.QemuMigrationTest,
            _ => throw RequestErrors.Invalid("spec.pattern", "one of SEQUENTIAL, UNIFORM, HOTSET_ZIPF, HOTSET_90_10, QEMU_MIGRATION_TEST"),
        },
        s.Seed, s.Threads == 0 ? 1 : (int)Math.Min(s.Threads, int.MaxValue), s.WriteRatio, s.DirtyRatePagesPerSec,
        TimeSpan.FromMilliseconds(Math.Min(s.DurationMs, (ulong)TimeSpan.MaxValue.TotalMilliseconds / 2)), s.OpCount,
        s.ZipfExponent == 0 ? 1.0 : s.ZipfExponent);

    public override Task<StartWorkloadResponse> StartWorkload(StartWorkloadRequest request, ServerCallContext context)
    {
        var mm = registry.Mm(request.MmId);
        if (request.Spec is null)
            throw RequestErrors.Invalid("spec", "required");
        var spec = ToModel(request.Spec);
        if (spec.Invalid() is { } bad)
            throw RequestErrors.Invalid("spec." + bad.Field, bad.Why);
        var host = mm.Host;
        var limits = registry.Quotas.Limits;
        // Before the model runs anything: a refused call gets no journal step.
        if (host.Journal is not null)
            throw RequestErrors.Precondition("JOURNALED_MACHINE", $"machine {host.Id} keeps a session journal: a workload's steps follow real time, which a replay cannot reproduce");
        Security.Quotas.Check(spec.Threads - 1, limits.ThreadsPerWorkload, nameof(Security.LimitOptions.ThreadsPerWorkload), "a workload");
        var w = host.Run(() =>
        {
            if (mm.Mm.Exited)
                throw RequestErrors.Precondition("PROCESS_EXITED", $"process {mm.Id} has exited");
            Security.Quotas.Check(host.Workloads.Count(x => x.State == WorkloadState.Running), limits.WorkloadsPerMachine, nameof(Security.LimitOptions.WorkloadsPerMachine), $"machine {host.Id}");
            Security.Quotas.Check(host.LiveThreads + spec.Threads - 1, limits.ThreadsPerMachine, nameof(Security.LimitOptions.ThreadsPerMachine), $"machine {host.Id}");
            var entry = registry.Add(id => new WorkloadEntry(id, host, mm, spec, request.Spec, limits.WorkloadWritesRecorded));
            for (var i = 0; i < spec.Threads; i++)
            {
                var t = registry.Thread(registry.IdOf(host, host.Kernel.CreateThread(mm.Mm, entry.Group)));
                t.WorkloadId = entry.Id;
                entry.Threads.Add(new Hosting.WorkloadThread(t, i));
            }
            host.Workloads.Add(entry);
            // Ended workloads are kept up to the same number; the oldest are forgotten first.
            var ended = host.Workloads.Where(x => x.State != WorkloadState.Running).ToList();
            foreach (var old in ended.Take(Math.Max(0, ended.Count - limits.WorkloadsPerMachine)))
            {
                host.Workloads.Remove(old);
                registry.Remove(old);
            }
            return entry;
        });
        var info = Info(w);
        w.Run();
        return Task.FromResult(new StartWorkloadResponse { Workload = info });
    }

    public override Task<GetWorkloadResponse> GetWorkload(GetWorkloadRequest request, ServerCallContext context) =>
        Task.FromResult(new GetWorkloadResponse { Workload = Info(Workload(request.WorkloadId)) });

    public override Task<ListWorkloadsResponse> ListWorkloads(ListWorkloadsRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        var r = new ListWorkloadsResponse();
        h.Kernel.Locked(() => r.Workloads.AddRange(h.Workloads.Select(w => w.Info(ProtoMapping.StateOf))));
        return Task.FromResult(r);
    }

    public override async Task<StopWorkloadResponse> StopWorkload(StopWorkloadRequest request, ServerCallContext context)
    {
        var w = Workload(request.WorkloadId);
        w.Host.Run(w.Stop);
        // Every thread has exited: the loops end at once.
        await w.Ended.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        return new StopWorkloadResponse { Workload = Info(w) };
    }

    public override async Task<WaitWorkloadResponse> WaitWorkload(WaitWorkloadRequest request, ServerCallContext context)
    {
        var w = Workload(request.WorkloadId);
        await w.Ended.Task.WaitAsync(context.CancellationToken).ConfigureAwait(false);
        return new WaitWorkloadResponse { Workload = Info(w) };
    }

    public override Task<ReadWritesResponse> ReadWrites(ReadWritesRequest request, ServerCallContext context)
    {
        var w = Workload(request.WorkloadId);
        RequestErrors.Require(request.MaxEntries <= MaxWritesPerCall, "max_entries", $"at most {MaxWritesPerCall}");
        var max = request.MaxEntries == 0 ? MaxWritesPerCall : (int)request.MaxEntries;
        var r = new ReadWritesResponse();
        w.Host.Kernel.Locked(() =>
        {
            var list = w.WritesFrom(request.FromIndex, max);
            r.Writes.AddRange(list);
            r.NextIndex = request.FromIndex + (ulong)list.Count;
            r.Recorded = w.Recorded;
            r.Truncated = w.Truncated;
        });
        return Task.FromResult(r);
    }
}
