using BenchmarkDotNet.Attributes;
using Google.Protobuf;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Benchmarks;

/// <summary>The wire encoding of the Serve stream's batches: 64 page-fault messages out, 64 un-protect resolutions in, and their results.</summary>
[MemoryDiagnoser]
public class RpcBenchmarks
{
    private const int Batch = 64;
    private ServeResponse _messages = null!;
    private ServeRequest _resolutions = null!;
    private byte[] _messagesBytes = null!;
    private byte[] _resolutionsBytes = null!;

    [GlobalSetup]
    public void Setup()
    {
        _messages = new ServeResponse();
        _resolutions = new ServeRequest();
        for (var i = 0; i < Batch; i++)
        {
            var a = 0x7e00_0000_0000UL + ((ulong)i << 12);
            _messages.Messages.Add(new UffdMsg { Event = UffdEvent.Pagefault, UffdId = 0x1234_5678_9abc, Pagefault = new Pagefault { Flags = 3, Address = a, Ptid = 1000, Write = true, Wp = true } });
            _resolutions.Resolutions.Add(new Resolution { Tag = (ulong)i, UffdioWriteprotect = new UffdioWriteprotectRequest { Start = a, Len = 4096 } });
        }
        _messagesBytes = _messages.ToByteArray();
        _resolutionsBytes = _resolutions.ToByteArray();
    }

    [Benchmark(OperationsPerInvoke = Batch)]
    public byte[] SerializeMessageBatch() => _messages.ToByteArray();

    [Benchmark(OperationsPerInvoke = Batch)]
    public int ParseMessageBatch() => ServeResponse.Parser.ParseFrom(_messagesBytes).Messages.Count;

    [Benchmark(OperationsPerInvoke = Batch)]
    public int ParseResolutionBatch() => ServeRequest.Parser.ParseFrom(_resolutionsBytes).Resolutions.Count;
}
