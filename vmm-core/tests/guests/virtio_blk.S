/* rbx holds BASE throughout: addresses above 2 GiB cannot be 64-bit-mode displacements. */
/* A minimal virtio-mmio version-2 driver for the virtio-blk device in slot 0: handshake, one queue,
   write sector 1, read it back and compare, then a read past the end of the disk and a write whose
   buffer lies outside guest memory (both must fail with a status, not crash the VMM).
   Exit codes: 0 success, 1x probe/handshake failures, 2x request failures, 3x data mismatch. */
.equ BASE, 0xd0000000
.equ DESC, 0x200000
.equ AVAIL, 0x201000
.equ USED, 0x202000
.equ HDR, 0x203000
.equ WBUF, 0x204000
.equ STATUS, 0x205000
.equ RBUF, 0x206000

.macro reg_write off, val
    mov dword ptr [rbx + \off], \val
.endm

/* Queue descriptor \n: addr, len, flags, next. */
.macro desc n, addr, len, flags, next
    mov rax, \addr
    mov qword ptr [DESC + 16 * \n], rax
    mov dword ptr [DESC + 16 * \n + 8], \len
    mov word ptr [DESC + 16 * \n + 12], \flags
    mov word ptr [DESC + 16 * \n + 14], \next
.endm

/* Offers chain \head as request number \count (1-based), notifies, waits for the used ring,
   and leaves the status byte in al. */
.macro submit head, count, fail
    mov byte ptr [STATUS], 0xff
    mov word ptr [AVAIL + 4 + 2 * (\count - 1)], \head
    mfence
    mov word ptr [AVAIL + 2], \count
    mfence
    reg_write 0x50, 0
    mov ecx, 1000000
1:  cmp word ptr [USED + 2], \count
    je 2f
    dec ecx
    jnz 1b
    power_off \fail
2:  mov al, byte ptr [STATUS]
.endm

.global _start
_start:
    mov ebx, BASE
    cmp dword ptr [rbx + 0x00], 0x74726976   /* MagicValue "virt" */
    je 1f
    power_off 10
1:  cmp dword ptr [rbx + 0x04], 2            /* Version */
    je 1f
    power_off 11
1:  cmp dword ptr [rbx + 0x08], 2            /* DeviceID: block */
    je 1f
    power_off 12
1:  reg_write 0x70, 0                         /* reset */
    reg_write 0x70, 1                         /* ACKNOWLEDGE */
    reg_write 0x70, 3                         /* DRIVER */
    reg_write 0x14, 1                         /* DeviceFeaturesSel = 1 */
    test dword ptr [rbx + 0x10], 1           /* VERSION_1 offered */
    jnz 1f
    power_off 13
1:  reg_write 0x24, 1
    reg_write 0x20, 1                         /* accept VERSION_1 only */
    reg_write 0x24, 0
    reg_write 0x20, 0
    reg_write 0x70, 0xb                       /* FEATURES_OK */
    test dword ptr [rbx + 0x70], 8
    jnz 1f
    power_off 14
1:  reg_write 0x30, 0                         /* QueueSel */
    cmp dword ptr [rbx + 0x34], 8            /* QueueNumMax */
    jae 1f
    power_off 15
1:  reg_write 0x38, 8
    reg_write 0x80, DESC
    reg_write 0x84, 0
    reg_write 0x90, AVAIL
    reg_write 0x94, 0
    reg_write 0xa0, USED
    reg_write 0xa4, 0
    reg_write 0x44, 1                         /* QueueReady */
    reg_write 0x70, 0xf                       /* DRIVER_OK */
    test dword ptr [rbx + 0x70], 0x40        /* DEVICE_NEEDS_RESET? */
    jz 1f
    power_off 16

1:  /* fill the write buffer with a pattern: byte i = i * 7 + 1 */
    mov rdi, WBUF
    xor ecx, ecx
2:  mov eax, ecx
    imul eax, eax, 7
    inc eax
    mov byte ptr [rdi + rcx], al
    inc ecx
    cmp ecx, 512
    jne 2b

    /* request 1: OUT sector 1 */
    mov dword ptr [HDR], 1
    mov dword ptr [HDR + 4], 0
    mov qword ptr [HDR + 8], 1
    desc 0, HDR, 16, 1, 1
    desc 1, WBUF, 512, 1, 2
    desc 2, STATUS, 1, 2, 0
    submit 0, 1, 20
    test al, al
    jz 1f
    power_off 21

1:  /* request 2: IN sector 1 */
    mov dword ptr [HDR + 0x100], 0
    mov dword ptr [HDR + 0x104], 0
    mov qword ptr [HDR + 0x108], 1
    desc 3, HDR + 0x100, 16, 1, 4
    desc 4, RBUF, 512, 3, 5
    desc 5, STATUS, 1, 2, 0
    submit 3, 2, 22
    test al, al
    jz 1f
    power_off 23
1:  mov rsi, WBUF
    mov rdi, RBUF
    mov ecx, 512
    repe cmpsb
    je 1f
    power_off 30

1:  /* request 3: IN far past the end of the disk must fail with IOERR (1) */
    mov dword ptr [HDR + 0x200], 0
    mov dword ptr [HDR + 0x204], 0
    mov rax, 0x100000000
    mov qword ptr [HDR + 0x208], rax
    desc 6, HDR + 0x200, 16, 1, 7
    desc 7, RBUF, 512, 3, 1
    desc 1, STATUS, 1, 2, 0
    submit 6, 3, 24
    cmp al, 1
    je 1f
    power_off 25

1:  /* request 4: OUT from a buffer outside guest memory must fail with a status, not crash */
    mov dword ptr [HDR + 0x300], 1
    mov dword ptr [HDR + 0x304], 0
    mov qword ptr [HDR + 0x308], 2
    desc 2, HDR + 0x300, 16, 1, 0
    mov word ptr [DESC + 16 * 2 + 14], 4
    mov rax, 0x7fff00000000
    desc 4, rax, 512, 1, 5
    desc 5, STATUS, 1, 2, 0
    submit 2, 4, 26
    cmp al, 1
    je 1f
    power_off 27

1:  print ok
    power_off 0
ok: .asciz "virtio-blk round trip ok\n"
