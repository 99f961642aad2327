;; Makes one successful host call, then traps (`unreachable`).
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\82\a2op\a4ping\a7payload\01")
  (func (export "_start")
    (drop (call $call (i32.const 1024) (i32.const 18) (i32.const 2048) (i32.const 1024)))
    unreachable))
