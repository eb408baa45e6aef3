using Google.Protobuf;
using UffdGrpc.Contracts.V1;
using UffdGrpc.Server.Mapping;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Hosting;

/// <summary>The <c>Persistence</c> section: a directory where a graceful shutdown saves every machine and a start loads them (off when empty, the default).</summary>
public sealed class PersistenceOptions
{
    public const string Section = "Persistence";

    public string Directory { get; set; } = "";
}

/// <summary>
/// Saves every machine as a MachineImage file (machine-ID.img: profile, settings, owner,
/// grantees, and each process as an MmImage) and loads them again into new machines. Files
/// shared by several processes are saved with each and come back as separate copies.
/// </summary>
public sealed partial class MachinePersistence(MachineRegistry registry, Microsoft.Extensions.Options.IOptions<PersistenceOptions> options, ILogger<MachinePersistence> logger)
{
    private string Dir => options.Value.Directory;

    public bool Enabled => Dir.Length > 0;

    [LoggerMessage(EventId = 30, EventName = "MachinesSaved", Level = LogLevel.Information, Message = "Saved {Count} machine(s) to {Directory}")]
    private static partial void Saved(ILogger logger, int count, string directory);

    [LoggerMessage(EventId = 31, EventName = "MachinesLoaded", Level = LogLevel.Information, Message = "Loaded {Count} machine(s) from {Directory}")]
    private static partial void Loaded(ILogger logger, int count, string directory);

    [LoggerMessage(EventId = 32, EventName = "MachineNotLoaded", Level = LogLevel.Warning, Message = "Could not load {File}: {Reason}")]
    private static partial void NotLoaded(ILogger logger, string file, string reason);

    /// <summary>Writes every machine that can be trusted (not broken) to the directory.</summary>
    public void SaveAll()
    {
        if (!Enabled)
            return;
        System.IO.Directory.CreateDirectory(Dir);
        foreach (var old in System.IO.Directory.GetFiles(Dir, "machine-*.img"))
            File.Delete(old);
        var n = 0;
        foreach (var h in registry.AllMachines().Where(h => h.Broken is null))
        {
            var image = h.Kernel.Locked(() =>
            {
                var k = h.Kernel;
                var m = new MachineImage
                {
                    Version = MmImages.Version,
                    Profile = ProtoMapping.ToProto(k.Profile),
                    Owner = h.Owner,
                    Settings = new MachineSettings
                    {
                        Swap = k.Config.Swap,
                        SoftDirty = k.Config.SoftDirty,
                        MemoryFailure = k.Config.MemoryFailure,
                        Thp = ProtoMapping.ToProto(k.Config.Thp),
                        ReadFaultZeroPage = k.Config.ReadFaultZeroPage,
                        MemoryBytes = k.Config.MemoryBytes,
                        SwapBytes = k.Config.SwapBytes,
                    },
                };
                m.Grantees.AddRange(h.Grantees);
                m.Mms.AddRange(k.Mms.Where(mm => !mm.Exited).Select(MmImages.Export));
                return m;
            });
            var path = Path.Combine(Dir, $"machine-{h.Id}.img");
            File.WriteAllBytes(path + ".tmp", image.ToByteArray());
            File.Move(path + ".tmp", path, overwrite: true);
            n++;
        }
        Saved(logger, n, Dir);
    }

    /// <summary>Creates a machine for every saved image (new ids; the owner and grants as saved).</summary>
    public void LoadAll()
    {
        if (!Enabled || !System.IO.Directory.Exists(Dir))
            return;
        var n = 0;
        foreach (var file in System.IO.Directory.GetFiles(Dir, "machine-*.img").Order(StringComparer.Ordinal))
        {
            try
            {
                var image = MachineImage.Parser.ParseFrom(File.ReadAllBytes(file));
                if (image.Version != MmImages.Version)
                    throw new InvalidDataException($"version {image.Version}");
                foreach (var mm in image.Mms)
                    MmImages.Validate(mm);
                var s = image.Settings ?? new MachineSettings();
                var config = new Model.MachineConfig
                {
                    Swap = s.Swap ?? false,
                    SoftDirty = s.SoftDirty ?? false,
                    MemoryFailure = s.MemoryFailure ?? false,
                    Thp = ProtoMapping.ToModel(s.Thp, Model.ThpMode.Madvise),
                    ReadFaultZeroPage = s.ReadFaultZeroPage ?? true,
                    MemoryBytes = s.MemoryBytes ?? new Model.MachineConfig().MemoryBytes,
                    SwapBytes = s.SwapBytes ?? new Model.MachineConfig().SwapBytes,
                };
                var h = registry.CreateMachine(ProtoMapping.ToModel(image.Profile), config, image.Owner.Length > 0 ? image.Owner : Security.AuthOptions.AnonymousPrincipal);
                foreach (var g in image.Grantees)
                    h.Grant(g);
                h.Run(() =>
                {
                    foreach (var mmImage in image.Mms)
                    {
                        var (errno, mm, ctxs) = MmImages.Import(h.Kernel, mmImage);
                        if (mm is null)
                            throw new InvalidDataException($"a process did not restore ({errno})");
                        registry.IdOf(h, mm);
                        foreach (var c in ctxs)
                            registry.IdOf(h, c);
                    }
                });
                n++;
            }
            catch (Exception ex) when (ex is InvalidProtocolBufferException or InvalidDataException or IOException or Grpc.Core.RpcException)
            {
                NotLoaded(logger, file, ex.Message);
            }
        }
        Loaded(logger, n, Dir);
    }
}
