using Google.Protobuf;
using UffdGrpc.Contracts.V1;

namespace UffdGrpc.Client;

/// <summary>
/// A session journal as a file (journal.proto, format version 1): delimited
/// <see cref="JournalRecord"/>s, the header first, then the entries in step order, then the end.
/// </summary>
public sealed class SessionJournal
{
    public const uint FormatVersion = 1;

    public required JournalHeader Header { get; init; }
    public required IReadOnlyList<JournalEntry> Entries { get; init; }
    public required JournalEnd End { get; init; }

    /// <summary>The CreateMachine request the journal starts from (profile, settings, seeds).</summary>
    public CreateMachineRequest CreateRequest => CreateMachineRequest.Parser.ParseFrom(Header.CreateMachineRequest);

    /// <summary>Reads the whole journal of machine <paramref name="machineId"/> (and its state digest now) from a server.</summary>
    public static async Task<SessionJournal> ExportAsync(UffdClient client, long machineId, CancellationToken ct = default)
    {
        ArgumentNullException.ThrowIfNull(client);
        var entries = new List<JournalEntry>();
        JournalHeader? header = null;
        long from = 1;
        while (true)
        {
            var page = await client.Machines.ReadJournalAsync(new ReadJournalRequest { MachineId = machineId, FromStep = from, StateDigest = true }, cancellationToken: ct).ConfigureAwait(false);
            header ??= page.Header;
            entries.AddRange(page.Entries);
            if (page.Entries.Count == 0 || page.NextStep > page.Steps)
                return new SessionJournal { Header = header, Entries = entries, End = new JournalEnd { Steps = entries.Count, StateDigest = page.StateDigest } };
            from = page.NextStep;
        }
    }

    public void WriteTo(Stream stream)
    {
        new JournalRecord { Header = Header }.WriteDelimitedTo(stream);
        foreach (var e in Entries)
            new JournalRecord { Entry = e }.WriteDelimitedTo(stream);
        new JournalRecord { End = End }.WriteDelimitedTo(stream);
    }

    public void Save(string path)
    {
        using var f = File.Create(path);
        WriteTo(f);
    }

    /// <summary>Reads a journal file; a malformed one is an <see cref="InvalidDataException"/> that says where.</summary>
    public static SessionJournal ReadFrom(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        JournalHeader? header = null;
        JournalEnd? end = null;
        var entries = new List<JournalEntry>();
        for (var i = 0; stream.Position < stream.Length; i++)
        {
            JournalRecord r;
            try
            {
                r = JournalRecord.Parser.ParseDelimitedFrom(stream);
            }
            catch (InvalidProtocolBufferException ex)
            {
                throw new InvalidDataException($"journal record {i}: {ex.Message}", ex);
            }
            switch (r.RecordCase)
            {
                case JournalRecord.RecordOneofCase.Header when i == 0:
                    header = r.Header;
                    if (header.FormatVersion != FormatVersion)
                        throw new InvalidDataException($"journal format version {header.FormatVersion}; this reader knows {FormatVersion}");
                    break;
                case JournalRecord.RecordOneofCase.Entry when header is not null && end is null:
                    if (r.Entry.Step != entries.Count + 1)
                        throw new InvalidDataException($"journal record {i}: step {r.Entry.Step} where {entries.Count + 1} was due");
                    entries.Add(r.Entry);
                    break;
                case JournalRecord.RecordOneofCase.End when header is not null && end is null:
                    end = r.End;
                    break;
                default:
                    throw new InvalidDataException($"journal record {i}: a {r.RecordCase} record is out of place (header, entries, end)");
            }
        }
        if (header is null || end is null)
            throw new InvalidDataException("the journal has no " + (header is null ? "header" : "end record"));
        return new SessionJournal { Header = header, Entries = entries, End = end };
    }

    public static SessionJournal Load(string path)
    {
        using var f = File.OpenRead(path);
        return ReadFrom(f);
    }
}
