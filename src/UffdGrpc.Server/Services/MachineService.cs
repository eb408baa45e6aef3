using Google.Protobuf;
using Grpc.Core;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Hosting;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Services;

/// <summary>MachineService: create (profile + settings), configure, list, destroy, kpageflags.</summary>
public sealed class MachineService(MachineRegistry registry, ILogger<MachineService> logger, Microsoft.Extensions.Options.IOptions<Configuration.ServerOptions> server) : Contracts.V1.MachineService.MachineServiceBase
{
    internal static MachineInfo Info(MachineHost h) => h.Kernel.Locked(() =>
    {
        var k = h.Kernel;
        var info = new MachineInfo
        {
            MachineId = h.Id,
            Profile = ProtoMapping.ToProto(k.Profile),
            Swap = k.Config.Swap,
            SoftDirty = k.Config.SoftDirty,
            MemoryFailure = k.Config.MemoryFailure,
            Thp = ProtoMapping.ToProto(k.Config.Thp),
            ReadFaultZeroPage = k.Config.ReadFaultZeroPage,
            UffdFeatures = (ulong)Model.UserfaultfdCtx.AvailableFeatures(k.Profile),
            PagemapScan = k.HasPagemapScan,
            MaxCopyBytes = k.Config.MaxCopyBytes,
            LiveFrames = k.LiveFrames,
            Broken = h.Broken ?? "",
            Owner = h.Owner,
            MemoryBytes = k.MemoryBytes,
            UsedPages = k.UsedPages,
            SwapTotalPages = k.SwapTotalPages,
            SwapUsedPages = k.SwapUsedPages,
            OomKills = k.OomKillCount,
            ScheduleSeed = k.ScheduleSeed,
            Journal = h.Journal is not null,
            JournalSteps = h.Journal?.Steps ?? 0,
        };
        info.Grantees.AddRange(h.Grantees);
        info.MmIds.AddRange(h.MmIds.Where(p => !p.Key.Exited).Select(p => p.Value).Order());
        return info;
    });

    /// <summary>
    /// The 6.1 profile has CONFIG_MEM_SOFT_DIRTY and CONFIG_MEMORY_FAILURE built in
    /// (<see cref="Model.Kernel.ConfigIsBuiltIn"/>): a request to turn either off is refused.
    /// </summary>
    private static void RequireBuiltInConfig(Model.KernelProfile profile, MachineSettings? s)
    {
        if (!Model.Kernel.ConfigIsBuiltIn(profile))
            return;
        RequestErrors.Require(s?.SoftDirty is null or true, "settings.soft_dirty", "the 6.1 profile's kernel is built with CONFIG_MEM_SOFT_DIRTY=y");
        RequestErrors.Require(s?.MemoryFailure is null or true, "settings.memory_failure", "the 6.1 profile's kernel is built with CONFIG_MEMORY_FAILURE=y");
    }

    private static Model.MachineConfig Apply(Model.MachineConfig c, MachineSettings? s) => s is null ? c : c with
    {
        Swap = s.Swap ?? c.Swap,
        SoftDirty = s.SoftDirty ?? c.SoftDirty,
        MemoryFailure = s.MemoryFailure ?? c.MemoryFailure,
        Thp = ProtoMapping.ToModel(s.Thp, c.Thp),
        ReadFaultZeroPage = s.ReadFaultZeroPage ?? c.ReadFaultZeroPage,
    };

    public override Task<CreateMachineResponse> CreateMachine(CreateMachineRequest request, ServerCallContext context)
    {
        // Server:DefaultProfile when the request names none.
        var profile = request.Profile == KernelProfile.Unspecified ? server.Value.Profile : ProtoMapping.ToModel(request.Profile);
        var limits = registry.Quotas.Limits;
        var s = request.Settings;
        RequestErrors.Require(s?.MemoryBytes is null or (>= 1 << 20 and <= (ulong)long.MaxValue) && (s?.MemoryBytes ?? 0) <= (ulong)limits.MaxMachineMemoryBytes && (s?.MemoryBytes ?? 0) % Model.Kernel.PageSize == 0,
            "settings.memory_bytes", $"a multiple of 4096 from 1 MiB to {limits.MaxMachineMemoryBytes} (Limits:MaxMachineMemoryBytes)");
        RequestErrors.Require(s?.SwapBytes is null or <= 1UL << 40, "settings.swap_bytes", "at most 1 TiB");
        RequireBuiltInConfig(profile, s);
        var defaults = Model.Kernel.DefaultConfig(profile);
        var config = Apply(defaults, s) with
        {
            MemoryBytes = s?.MemoryBytes ?? defaults.MemoryBytes,
            SwapBytes = s?.SwapBytes ?? defaults.SwapBytes,
        };
        var journal = s?.Journal == true ? new JournalHeader { FormatVersion = 1, CreateMachineRequest = request.ToByteString() } : null;
        var h = registry.CreateMachine(profile, config, Security.Caller.Principal ?? Security.AuthOptions.AnonymousPrincipal, journal);
        if (s?.ScheduleSeed is { } seed)
            h.Kernel.SetSchedule(seed);
        Log.MachineCreated(logger, h.Id, profile);
        var response = new CreateMachineResponse { Machine = Info(h) };
        if (journal is not null)
            h.Kernel.Locked(() => journal.CreateMachineResponse = response.ToByteString());
        return Task.FromResult(response);
    }

    public override Task<GetMachineResponse> GetMachine(GetMachineRequest request, ServerCallContext context) =>
        Task.FromResult(new GetMachineResponse { Machine = Info(registry.MachineEvenIfBroken(request.MachineId)) });

    public override Task<ListMachinesResponse> ListMachines(ListMachinesRequest request, ServerCallContext context)
    {
        var (page, next) = Paging.Take(registry.Machines, m => m.Id, request.PageSize, request.PageToken);
        var r = new ListMachinesResponse { NextPageToken = next };
        r.Machines.AddRange(page.Select(Info));
        return Task.FromResult(r);
    }

    public override Task<ConfigureMachineResponse> ConfigureMachine(ConfigureMachineRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        _ = ProtoMapping.ToModel(request.Settings?.Thp ?? ThpMode.Unspecified, Model.ThpMode.Madvise);
        RequestErrors.Require(request.Settings?.MemoryBytes is null && request.Settings?.SwapBytes is null, "settings.memory_bytes", "the memory and swap sizes are set at CreateMachine only");
        RequireBuiltInConfig(h.Kernel.Profile, request.Settings);
        h.Run(() =>
        {
            h.Kernel.Configure(c => Apply(c, request.Settings));
            if (request.Settings?.ScheduleSeed is { } seed)
                h.Kernel.SetSchedule(seed);
        });
        return Task.FromResult(new ConfigureMachineResponse { Machine = Info(h) });
    }

    /// <summary>The machine <paramref name="id"/>, which the caller must own (a grantee gets PERMISSION_DENIED).</summary>
    private MachineHost Owned(long id, string what)
    {
        var h = registry.MachineEvenIfBroken(id);
        if (Security.Caller.Principal is { } p && p != h.Owner)
            throw new RpcException(new Status(StatusCode.PermissionDenied, $"only the owner of machine {id} may {what}"));
        return h;
    }

    public override Task<GrantMachineAccessResponse> GrantMachineAccess(GrantMachineAccessRequest request, ServerCallContext context)
    {
        RequestErrors.Require(request.Principal.Length is > 0 and <= 256, "principal", "a principal name (1-256 characters)");
        var h = Owned(request.MachineId, "grant access");
        h.Grant(request.Principal);
        return Task.FromResult(new GrantMachineAccessResponse { Machine = Info(h) });
    }

    public override Task<RevokeMachineAccessResponse> RevokeMachineAccess(RevokeMachineAccessRequest request, ServerCallContext context)
    {
        RequestErrors.Require(request.Principal.Length is > 0 and <= 256, "principal", "a principal name (1-256 characters)");
        var h = Owned(request.MachineId, "revoke access");
        h.Revoke(request.Principal);
        return Task.FromResult(new RevokeMachineAccessResponse { Machine = Info(h) });
    }

    public override Task<DestroyMachineResponse> DestroyMachine(DestroyMachineRequest request, ServerCallContext context)
    {
        var h = Owned(request.MachineId, "destroy it");
        registry.Destroy(h);
        Log.MachineDestroyed(logger, h.Id);
        return Task.FromResult(new DestroyMachineResponse());
    }

    private const int DefaultJournalPage = 1000;
    private const int MaxJournalPage = 10000;

    /// <summary>The session journal from a step on; with wait, sleeps on the journal until that step exists (or the machine ends).</summary>
    public override async Task<ReadJournalResponse> ReadJournal(ReadJournalRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        RequestErrors.Require(request.FromStep >= 0, "from_step", "0 or more");
        RequestErrors.Require(request.MaxEntries is >= 0 and <= MaxJournalPage, "max_entries", $"0 (the default, {DefaultJournalPage}) to {MaxJournalPage}");
        if (h.Journal is not { } journal)
            throw RequestErrors.Precondition("NO_JOURNAL", $"machine {h.Id} was not created with settings.journal");
        var from = Math.Max(1, request.FromStep);
        var max = request.MaxEntries == 0 ? DefaultJournalPage : request.MaxEntries;
        while (true)
        {
            var wake = journal.Appended.Next;
            var r = h.Kernel.Locked(() =>
            {
                if (request.Wait && journal.Steps < from)
                    return null;
                var page = new ReadJournalResponse { Header = journal.Header, Steps = journal.Steps };
                page.Entries.AddRange(journal.Read(from, max));
                page.NextStep = from + page.Entries.Count;
                return page;
            });
            if (r is not null)
            {
                if (request.StateDigest)
                    r.StateDigest = Google.Protobuf.ByteString.CopyFrom(h.Kernel.StateDigest());
                return r;
            }
            await wake.WaitAsync(context.CancellationToken).ConfigureAwait(false);
            if (registry.Unusable(h) is { } status)
                throw status;
        }
    }

    public override Task<KpageflagsResponse> Kpageflags(KpageflagsRequest request, ServerCallContext context)
    {
        var h = registry.Machine(request.MachineId);
        RequestErrors.Require(request.Pfns.Count <= ProtoMapping.MaxPagesPerRequest, "pfns", $"at most {ProtoMapping.MaxPagesPerRequest} frames");
        var r = new KpageflagsResponse();
        h.Kernel.Locked(() =>
        {
            // KpageFlags reads the machine's frame table; any address space of the machine
            // serves, and a machine without one has no mapped frames to describe.
            var any = h.Kernel.Mms.Count > 0 ? h.Kernel.Mms[0] : null;
            foreach (var pfn in request.Pfns)
            {
                var f = any?.KpageFlags(pfn) ?? 0;
                r.Flags.Add(f);
                r.ZeroPage.Add((f & (1UL << Model.Uapi.KpfZeroPage)) != 0);
                r.Thp.Add((f & (1UL << Model.Uapi.KpfThp)) != 0);
            }
        });
        return Task.FromResult(r);
    }
}
