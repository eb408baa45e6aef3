namespace UffdGrpc;

/// <summary>
/// Defaults shared by the server and its clients (linked into each assembly, not shipped
/// as a library of its own): the server listens where every CLI command and the SDK
/// connect unless told otherwise.
/// </summary>
internal static class UffdDefaults
{
    /// <summary>
    /// The server's listen URL when no <c>urls</c>, <c>http_ports</c>, <c>https_ports</c> or
    /// <c>Kestrel:Endpoints</c> is configured, and the address clients use by default:
    /// plaintext HTTP/2 (h2c) on loopback.
    /// </summary>
    public const string Address = "http://127.0.0.1:5051";
}
