namespace UffdGrpc.Mm;

/// <summary>
/// Models process_vm_readv(2) (<see cref="Write"/> false) and process_vm_writev(2)
/// (mm/process_vm_access.c: process_vm_rw → process_vm_rw_core →
/// process_vm_rw_single_vec → process_vm_rw_pages) on the caller thread, whose mm is the
/// local side. The remote pages of each remote segment are pinned in batches of up to
/// <see cref="Mm.PvmMaxPagesPerLoop"/> pages (pin_user_pages_remote), then copied to or
/// from the local segments (copy_page_to_iter / copy_page_from_iter), then unpinned. The
/// call parks while a remote page waits in a userfault (GUP retries that page when woken,
/// keeping the pages already pinned) or while the local copy waits in one (the pins are
/// held meanwhile). The result is the number of bytes copied (<see cref="Transferred"/>)
/// if any, else the error: EFAULT when GUP or the local copy failed.
/// </summary>
public sealed class ProcessVmOp(Mm? remote, bool write, IoVec[] local, IoVec[] remoteVecs, ulong flags = 0) : SyscallOp
{
    private readonly List<Page> _pinned = [];
    private bool _started;
    private IoVec[] _local = local;
    private ulong _iterCount;
    private int _li;
    private ulong _liOff;
    private int _ri = -1;
    // process_vm_rw_single_vec state of the current remote segment.
    private ulong _pa, _startOffset, _len, _nrPages;
    private int _batchTarget;
    private bool _copying;
    // process_vm_rw_pages state of the current batch.
    private int _copyPage;
    private ulong _copyOffset, _batchLeft, _batchBytes;

    /// <summary>The target process's mm (null: no such process).</summary>
    public Mm? Remote { get; } = remote;
    /// <summary>process_vm_writev (local → remote) rather than process_vm_readv.</summary>
    public bool Write { get; } = write;
    public IReadOnlyList<IoVec> Local { get; } = local;
    public IReadOnlyList<IoVec> RemoteVecs { get; } = remoteVecs;
    public ulong Flags { get; } = flags;
    /// <summary>Bytes copied: the return value when the call did not fail.</summary>
    public ulong Transferred { get; private set; }

    protected internal override bool Step()
    {
        if (!_started)
        {
            _started = true;
            var v = Mm.ProcessVmRwCheck(Flags, [.. Local], [.. RemoteVecs], out _local, out _iterCount);
            if (v != Errno.OK || _iterCount == 0 || Mm.ProcessVmNrPages([.. RemoteVecs]) == 0)
            {
                Result = v;
                return true;
            }
            if (Remote is null || Remote.Exited)
            {
                Result = Errno.ESRCH;
                return true;
            }
        }
        var rc = RwCore();
        if (rc is null)
            return false;
        // process_vm_rw_core: any byte copied makes the call succeed with the count.
        Result = Transferred != 0 ? Errno.OK : rc.Value;
        return true;
    }

    /// <summary>The loop of process_vm_rw_core over the remote segments; null while parked.</summary>
    private Errno? RwCore()
    {
        while (_iterCount > 0)
        {
            if (_nrPages == 0)
            {
                if (++_ri >= RemoteVecs.Count)
                    return Errno.OK;
                var seg = RemoteVecs[_ri];
                _pa = seg.Base & ~(Kernel.PageSize - 1);
                _startOffset = seg.Base - _pa;
                _len = seg.Len;
                _nrPages = _len == 0 ? 0 : Mm.SpanPages(seg.Base, _len);
                continue;
            }
            var rc = SingleVecStep();
            if (rc is null)
                return null;
            if (rc != Errno.OK)
                return rc;
        }
        return Errno.OK;
    }

    /// <summary>One batch of process_vm_rw_single_vec: pin, copy, unpin. Null while parked.</summary>
    private Errno? SingleVecStep()
    {
        if (!_copying)
        {
            if (_pinned.Count == 0)
                _batchTarget = (int)Math.Min(_nrPages, (ulong)Mm.PvmMaxPagesPerLoop);
            while (_pinned.Count < _batchTarget)
            {
                var r = Remote!.PinUserPageRemote(Thread, _pa + ((ulong)_pinned.Count * Kernel.PageSize), Write, out var page);
                if (r == FaultResult.Blocked)
                    return null;
                if (r != FaultResult.Ok)
                    break;
                _pinned.Add(page!);
            }
            if (_pinned.Count == 0)
            {
                _nrPages = 0;
                return Errno.EFAULT;
            }
            _batchBytes = Math.Min(((ulong)_pinned.Count * Kernel.PageSize) - _startOffset, _len);
            _batchLeft = _batchBytes;
            _copyPage = 0;
            _copyOffset = _startOffset;
            _copying = true;
        }
        var rc = RwPages();
        if (rc is null)
            return null;
        _len -= _batchBytes;
        _startOffset = 0;
        _nrPages -= (ulong)_pinned.Count;
        _pa += (ulong)_pinned.Count * Kernel.PageSize;
        Unpin();
        _copying = false;
        if (rc != Errno.OK)
            _nrPages = 0;
        return rc;
    }

    /// <summary>process_vm_rw_pages: copies the batch page by page through the local iterator. Null while parked.</summary>
    private Errno? RwPages()
    {
        while (_batchLeft > 0 && _iterCount > 0)
        {
            var seg = _local[_li];
            if (_liOff == seg.Len)
            {
                _li++;
                _liOff = 0;
                continue;
            }
            var uaddr = seg.Base + _liOff;
            var n = Math.Min(Math.Min(Kernel.PageSize - _copyOffset, _batchLeft), seg.Len - _liOff);
            n = Math.Min(n, Kernel.PageSize - (uaddr & (Kernel.PageSize - 1)));
            var r = Mm.CopyUserChunk(Thread, uaddr, _pinned[_copyPage], (int)_copyOffset, (int)n, toUser: !Write);
            if (r == FaultResult.Blocked)
                return null;
            if (r != FaultResult.Ok)
                return Errno.EFAULT; // copied < copy with data left in the iterator
            _liOff += n;
            _iterCount -= n;
            Transferred += n;
            _batchLeft -= n;
            _copyOffset += n;
            if (_copyOffset == Kernel.PageSize)
            {
                _copyOffset = 0;
                _copyPage++;
            }
        }
        return Errno.OK;
    }

    private void Unpin()
    {
        foreach (var p in _pinned)
            Remote!.UnpinUserPage(p, dirty: Write);
        _pinned.Clear();
    }

    protected internal override void OnAbort() => Unpin();
}
