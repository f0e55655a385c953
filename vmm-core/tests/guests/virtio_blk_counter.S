/* Counts with virtio-blk requests, for the snapshot tests: after the handshake of virtio_blk.S (with a
   32-entry queue), step n (1, 2, ... LIMIT) writes the 8-byte value n to sector n. It posts the request in the available ring,
   waits a while (where a snapshot usually lands: the request is in flight, posted but not notified),
   notifies, waits until the used ring index is exactly n, and prints "count n" (hex). rbx holds BASE,
   r12 the count. Exit codes: 0 done, 1x handshake, 20 no completion, 21 error status. */
.equ BASE, 0xd0000000
.equ DESC, 0x200000
.equ AVAIL, 0x201000
.equ USED, 0x202000
.equ HDR, 0x203000
.equ WBUF, 0x204000
.equ STATUS, 0x205000

.macro reg_write off, val
    mov dword ptr [rbx + \off], \val
.endm

.global _start
_start:
    mov ebx, BASE
    cmp dword ptr [rbx + 0x08], 2            /* DeviceID: block */
    je 1f
    power_off 10
1:  reg_write 0x70, 0
    reg_write 0x70, 1
    reg_write 0x70, 3
    reg_write 0x24, 1
    reg_write 0x20, 1                         /* VERSION_1 only */
    reg_write 0x24, 0
    reg_write 0x20, 0
    reg_write 0x70, 0xb
    test dword ptr [rbx + 0x70], 8
    jnz 1f
    power_off 14
1:  reg_write 0x30, 0
    reg_write 0x38, 32
    reg_write 0x80, DESC
    reg_write 0x84, 0
    reg_write 0x90, AVAIL
    reg_write 0x94, 0
    reg_write 0xa0, USED
    reg_write 0xa4, 0
    reg_write 0x44, 1
    reg_write 0x70, 0xf
    test dword ptr [rbx + 0x70], 0x40
    jz 1f
    power_off 16
1:  xor r12, r12

next:
    inc r12
    /* Request n uses slot s = (n - 1) % 8: header HDR + 16 s (sector n), descriptors 3s..3s+2. The
       data buffer is shared and holds n, so a request served again later would write the current n
       into its older sector, which the test sees on the disk. */
    mov rax, r12
    dec rax
    and rax, 7
    mov r9, rax
    shl r9, 4
    mov dword ptr [HDR + r9], 1               /* VIRTIO_BLK_T_OUT */
    mov dword ptr [HDR + r9 + 4], 0
    mov qword ptr [HDR + r9 + 8], r12         /* sector n */
    lea r10, [rax + rax * 2]                  /* head descriptor 3s */
    mov r11, r10
    shl r11, 4
    lea rsi, [r9 + HDR]
    mov qword ptr [DESC + r11], rsi
    mov dword ptr [DESC + r11 + 8], 16
    mov word ptr [DESC + r11 + 12], 1         /* NEXT */
    lea edi, [r10 + 1]
    mov word ptr [DESC + r11 + 14], di
    mov qword ptr [DESC + r11 + 16], WBUF
    mov dword ptr [DESC + r11 + 24], 512
    mov word ptr [DESC + r11 + 28], 1
    lea edi, [r10 + 2]
    mov word ptr [DESC + r11 + 30], di
    mov qword ptr [DESC + r11 + 32], STATUS
    mov dword ptr [DESC + r11 + 40], 1
    mov word ptr [DESC + r11 + 44], 2         /* WRITE */
    mov word ptr [DESC + r11 + 46], 0
    mov qword ptr [WBUF], r12                 /* holding n */
    mov byte ptr [STATUS], 0xff
    mov rax, r12
    dec rax
    and rax, 31
    mov word ptr [AVAIL + 4 + 2 * rax], r10w
    mfence
    mov word ptr [AVAIL + 2], r12w
    mfence
    mov ecx, 150000
1:  loop 1b
    reg_write 0x50, 0                         /* notify */
    mov ecx, 10000000
2:  cmp word ptr [USED + 2], r12w
    je 3f
    dec ecx
    jnz 2b
    power_off 20
3:  cmp byte ptr [STATUS], 0
    je 4f
    power_off 21
4:  print prefix
    mov r8, r12
    mov ecx, 16
5:  rol r8, 4
    mov al, r8b
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 6f
    add al, 7
6:  out dx, al
    dec ecx
    jnz 5b
    mov al, 10
    out dx, al
    cmp r12, LIMIT
    jne next
    power_off 0
prefix: .asciz "count "
